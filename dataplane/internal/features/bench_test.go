package features

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// The data plane's own work per call (parse, checks, SQLite reads, statuses, encoding),
// without gRPC: go test -bench . ./internal/features/
func BenchmarkGetOnlineFeatures(b *testing.B) {
	now := time.Now().Unix()
	rows := map[string][][4]any{}
	var ids []string
	for i := 0; i < 100; i++ {
		id := fmt.Sprintf("bench-%d", i)
		ids = append(ids, id)
		k := entityKey("entity_id", id)
		rows["proj_activity"] = append(rows["proj_activity"], [4]any{k, "count", i64(int64(i)), now}, [4]any{k, "kind", str("x"), now})
		rows["proj_numeric"] = append(rows["proj_numeric"], [4]any{k, "mean", i64(1), now})
	}
	path := feastSQLite(b, rows)
	tr, _ := telemetry.NewTracing(context.Background(), "", "bench", nil)
	cfg := testConfig(config.Store{Type: "sqlite", Path: path, KeySerializationVersion: 3})
	cfg.MaxEntities = 100
	s, err := New(cfg, telemetry.NewMetrics(), auth.New(nil), tr, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	for _, n := range []int{1, 100} {
		req := encodeRequest(ids[:n], nil, "")
		b.Run(fmt.Sprintf("entities=%d", n), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, err := s.GetOnlineFeatures(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
