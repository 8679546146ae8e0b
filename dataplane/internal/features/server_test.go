package features

import (
	"context"
	"database/sql"
	"fmt"
	"math"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/auth"
	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"

	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
)

// Rows as Feast writes them (feast/infra/online_stores/sqlite.py): the table Feast creates,
// entity keys serialized, values serialized feast Values, event_ts int(naive_utc.timestamp()).
func feastSQLite(t testing.TB, rows map[string][][4]any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "online.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for table, list := range rows {
		if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS ` + quoteID(table) + ` (entity_key BLOB, feature_name TEXT,
			value BLOB, value_text TEXT, vector_value BLOB, event_ts timestamp, created_ts timestamp,
			PRIMARY KEY(entity_key, feature_name))`); err != nil {
			t.Fatal(err)
		}
		for _, r := range list {
			if _, err := db.Exec(`INSERT INTO `+quoteID(table)+` (entity_key, feature_name, value, event_ts, created_ts) VALUES (?, ?, ?, ?, ?)`,
				r[0], r[1], r[2], localEpoch(r[3].(int64)), nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	return path
}

// localEpoch is what Feast stores for a UTC instant: the UTC wall clock taken as local time.
func localEpoch(utc int64) int64 {
	wall := time.Unix(utc, 0).UTC()
	local := time.Date(wall.Year(), wall.Month(), wall.Day(), wall.Hour(), wall.Minute(), wall.Second(), 0, time.Local)
	return local.Unix()
}

func i64(x int64) []byte {
	return protowire.AppendVarint(protowire.AppendTag(nil, 4, protowire.VarintType), uint64(x))
}

func str(s string) []byte {
	return protowire.AppendString(protowire.AppendTag(nil, 2, protowire.BytesType), s)
}

func testConfig(store config.Store) *config.Features {
	hour := 3600.0
	return &config.Features{
		MaxEntities: 5, StoreTimeoutS: 2,
		Features: []config.Feature{
			{View: "activity", Name: "count", JoinKey: "entity_id", MaxAgeS: &hour},
			{View: "activity", Name: "kind", JoinKey: "entity_id", MaxAgeS: &hour},
			{View: "numeric", Name: "mean", JoinKey: "entity_id"},
			{View: "items", Name: "sold", JoinKey: "item_id", MaxAgeS: &hour},
		},
		Views: map[string]config.View{
			"activity": {Table: "proj_activity", Name: "activity"},
			"numeric":  {Table: "proj_numeric", Name: "numeric"},
			"items":    {Table: "proj_items", Name: "items"},
		},
		Store: store,
	}
}

// serve runs a Server on a loopback port and returns a raw client connection.
func serve(t *testing.T, cfg *config.Features, tokens ...auth.Token) *grpc.ClientConn {
	t.Helper()
	conn, _ := serveWith(t, cfg, tokens...)
	return conn
}

func serveWith(t *testing.T, cfg *config.Features, tokens ...auth.Token) (*grpc.ClientConn, *Server) {
	t.Helper()
	tr, _ := telemetry.NewTracing(context.Background(), "", "test", nil)
	s, err := New(cfg, telemetry.NewMetrics(), auth.New(tokens), tr, nil)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.ForceServerCodecV2(proxy.Codec{}))
	s.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(func() { g.Stop(); _ = s.Close() })
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, s
}

func encodeRequest(ids, refs []string, joinKey string) []byte {
	var b []byte
	for _, id := range ids {
		b = protowire.AppendString(protowire.AppendTag(b, 1, protowire.BytesType), id)
	}
	for _, r := range refs {
		b = protowire.AppendString(protowire.AppendTag(b, 2, protowire.BytesType), r)
	}
	if joinKey != "" {
		b = protowire.AppendString(protowire.AppendTag(b, 3, protowire.BytesType), joinKey)
	}
	return b
}

// answer is a decoded GetOnlineFeaturesResponse: refs, then "id ref=value/status@seconds".
func decodeResponse(t *testing.T, b []byte) []string {
	t.Helper()
	var refs, out []string
	err := pbwire.Walk(b, func(num protowire.Number, _ protowire.Type, v []byte, _ uint64) error {
		if num == 1 {
			refs = append(refs, string(v))
			return nil
		}
		var id string
		i := 0
		return pbwire.Walk(v, func(num protowire.Number, _ protowire.Type, v []byte, _ uint64) error {
			if num == 1 {
				id = string(v)
				return nil
			}
			val, st, sec := "none", uint64(0), int64(0)
			err := pbwire.Walk(v, func(num protowire.Number, _ protowire.Type, v []byte, x uint64) error {
				switch num {
				case 1:
					return pbwire.Walk(v, func(num protowire.Number, _ protowire.Type, v []byte, x uint64) error {
						if num == 1 {
							val = strconv.FormatFloat(math.Float64frombits(x), 'g', -1, 64)
						} else {
							val = strconv.Quote(string(v))
						}
						return nil
					})
				case 2:
					st = x
				case 3:
					sec, _, _ = parseTimestamp(v)
				}
				return nil
			})
			out = append(out, fmt.Sprintf("%s %s=%s/%d@%d", id, refs[i], val, st, sec))
			i++
			return err
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func call(conn *grpc.ClientConn, req []byte, md ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	var resp []byte
	err := conn.Invoke(ctx, path, req, &resp)
	return resp, err
}

func wantStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	if st := status.Convert(err); st.Code() != code || st.Message() != msg {
		t.Fatalf("got %v %q, want %v %q", st.Code(), st.Message(), code, msg)
	}
}

func sqliteFixture(t *testing.T) config.Store { return sqliteFixtureAt(t, time.Now().Unix()) }

// sqliteFixtureAt writes rows whose event times are relative to now (the caller's clock: one
// read twice could cross a second).
func sqliteFixtureAt(t *testing.T, now int64) config.Store {
	u1, u2, sku := entityKey("entity_id", "u1"), entityKey("entity_id", "u2"), entityKey("item_id", "sku")
	path := feastSQLite(t, map[string][][4]any{
		"proj_activity": {{u1, "count", i64(3), now - 10}, {u1, "kind", str("buy"), now - 10},
			{u2, "count", i64(1), now - 7200}, {u2, "kind", []byte{}, now - 7200}},
		"proj_numeric": {{u1, "mean", []byte{}, now - 5}},
		"proj_items":   {{sku, "sold", i64(9), now - 1}},
	})
	return config.Store{Type: "sqlite", Path: path, KeySerializationVersion: 3}
}

func TestServesSQLiteRowsLikePython(t *testing.T) {
	now := time.Now().Unix()
	conn := serve(t, testConfig(sqliteFixtureAt(t, now)))
	resp, err := call(conn, encodeRequest([]string{"u1", "u2", "nobody", "u1"}, nil, ""))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(decodeResponse(t, resp), "\n")
	// u1 fresh; u2 older than the hour: STALE, its null kind MISSING with the row's time;
	// nobody: MISSING without a time; a null value with a row keeps the row's time.
	want := strings.Join([]string{
		fmt.Sprintf("u1 activity:count=3/1@%d", now-10), fmt.Sprintf(`u1 activity:kind="buy"/1@%d`, now-10), fmt.Sprintf("u1 numeric:mean=none/2@%d", now-5),
		fmt.Sprintf("u2 activity:count=1/3@%d", now-7200), fmt.Sprintf("u2 activity:kind=none/2@%d", now-7200), "u2 numeric:mean=none/2@0",
		"nobody activity:count=none/2@0", "nobody activity:kind=none/2@0", "nobody numeric:mean=none/2@0",
		fmt.Sprintf("u1 activity:count=3/1@%d", now-10), fmt.Sprintf(`u1 activity:kind="buy"/1@%d`, now-10), fmt.Sprintf("u1 numeric:mean=none/2@%d", now-5),
	}, "\n")
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	resp, err = call(conn, encodeRequest([]string{"sku"}, []string{"items:sold", "items:sold"}, "item_id"))
	if err != nil {
		t.Fatal(err)
	}
	if got := decodeResponse(t, resp); len(got) != 2 || got[0] != fmt.Sprintf("sku items:sold=9/1@%d", now-1) || got[1] != got[0] {
		t.Fatalf("%q", got)
	}
}

func TestRefusalsAreThePythonServicesOwn(t *testing.T) {
	conn := serve(t, testConfig(sqliteFixture(t)), auth.Token{Name: "app", Secret: "features-token-123", Roles: []string{"features"}},
		auth.Token{Name: "ops", Secret: "operator-token-1234", Roles: []string{"operator"}})
	good := encodeRequest([]string{"u1"}, nil, "")
	_, err := call(conn, good)
	wantStatus(t, err, codes.Unauthenticated, "missing or invalid token")
	_, err = call(conn, []byte{0xff}, "authorization", "Bearer nope")
	wantStatus(t, err, codes.Unauthenticated, "missing or invalid token")
	_, err = call(conn, good, "authorization", "Bearer operator-token-1234")
	wantStatus(t, err, codes.PermissionDenied, "role 'features' is needed for /loopmesh.v1.FeatureService/GetOnlineFeatures")
	bearer := []string{"authorization", "bearer features-token-123"}
	if _, err := call(conn, good, bearer...); err != nil {
		t.Fatal(err)
	}
	for req, msg := range map[string]string{
		string([]byte{0x0a, 0x05, 'a'}):                                      undecodable,
		string([]byte{0x0a, 0x01, 0xff}):                                     undecodable,
		string(encodeRequest(nil, nil, "")):                                  "entity_ids: at least one entity id is required",
		string(encodeRequest(make([]string, 6), nil, "")):                    "entity_ids: 6 ids, at most 5 per request",
		string(encodeRequest([]string{"u1", "\u3000"}, nil, "")):             "entity_ids[1]: must not be empty",
		string(encodeRequest([]string{"u1"}, []string{"activity:nope"}, "")): "feature_refs[0]: unknown feature 'activity:nope'",
		string(encodeRequest([]string{"u1"}, []string{"items:sold"}, "")):    "feature_refs[0]: 'items:sold' is keyed by item_id, not 'entity_id'",
		string(encodeRequest([]string{"u1"}, nil, "user")):                   "join_key: no view has join key 'user' (entity_id, item_id)",
	} {
		_, err := call(conn, []byte(req), bearer...)
		wantStatus(t, err, codes.InvalidArgument, msg)
	}
}

func TestAStoreThatCannotBeReadIsUnavailable(t *testing.T) {
	store := config.Store{Type: "sqlite", Path: filepath.Join(t.TempDir(), "absent.db"), KeySerializationVersion: 3}
	conn := serve(t, testConfig(store))
	_, err := call(conn, encodeRequest([]string{"u1"}, nil, ""))
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.HasPrefix(st.Message(), "online store: ") {
		t.Fatalf("%v", err)
	}
}

func TestReplaceSwapsSchemaAndStore(t *testing.T) {
	first := sqliteFixture(t)
	tr, _ := telemetry.NewTracing(context.Background(), "", "test", nil)
	s, err := New(testConfig(first), telemetry.NewMetrics(), auth.New(nil), tr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cfg := testConfig(sqliteFixture(t))
	cfg.Features = cfg.Features[:1]
	if err := s.Replace(cfg); err != nil {
		t.Fatal(err)
	}
	resp, err := s.GetOnlineFeatures(context.Background(), encodeRequest([]string{"u1"}, nil, ""))
	if err != nil || len(decodeResponse(t, resp)) != 1 || s.Config().Store.Path == first.Path {
		t.Fatalf("%v %v", resp, err)
	}
}

// A real redis-server (Debian's package) when one is installed: rows as Feast writes them.
func TestServesRedisRowsLikePython(t *testing.T) {
	binary, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed")
	}
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	port := lis.Addr().(*net.TCPAddr).Port
	lis.Close()
	cmd := exec.Command(binary, "--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no",
		"--requirepass", "s3cret-pass", "--dir", t.TempDir())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	addr := "127.0.0.1:" + strconv.Itoa(port)
	password := "s3cret-pass"
	store := config.Store{Type: "redis", Project: "proj", KeySerializationVersion: 3,
		Redis: &config.Redis{Address: addr, Password: &password}}
	rs, err := openRedis(store)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for rs.client.Ping(ctx).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not answer")
		}
		time.Sleep(50 * time.Millisecond)
	}
	now := time.Now().Unix()
	ts := func(sec int64, nanos int32) string {
		b := protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), uint64(sec))
		return string(protowire.AppendVarint(protowire.AppendTag(b, 2, protowire.VarintType), uint64(nanos)))
	}
	u1 := string(entityKey("entity_id", "u1")) + "proj"
	// A late event moves the row time by microseconds (core._ViewState.row_time).
	if err := rs.client.HSet(ctx, u1, redisField("activity", "count"), string(i64(3)), redisField("activity", "kind"), string(str("buy")),
		"_ts:activity", ts(now-10, 999_999_000)).Err(); err != nil {
		t.Fatal(err)
	}
	conn := serve(t, testConfig(store))
	resp, err := call(conn, encodeRequest([]string{"u1", "nobody"}, []string{"activity:kind", "numeric:mean", "activity:count"}, ""))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(decodeResponse(t, resp), "\n")
	want := strings.Join([]string{
		fmt.Sprintf(`u1 activity:kind="buy"/1@%d`, now-10), "u1 numeric:mean=none/2@0", fmt.Sprintf("u1 activity:count=3/1@%d", now-10),
		"nobody activity:kind=none/2@0", "nobody numeric:mean=none/2@0", "nobody activity:count=none/2@0",
	}, "\n")
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	// A wrong password: UNAVAILABLE naming the store.
	wrong := "nope"
	bad := store
	bad.Redis = &config.Redis{Address: addr, Password: &wrong}
	_, err = call(serve(t, testConfig(bad)), encodeRequest([]string{"u1"}, nil, ""))
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.HasPrefix(st.Message(), "online store: ") {
		t.Fatalf("%v", err)
	}
}

func TestAnsweredCallsAreDrainedForThePythonMetrics(t *testing.T) {
	conn, s := serveWith(t, testConfig(sqliteFixture(t)))
	for _, req := range [][]byte{encodeRequest([]string{"u1"}, nil, ""), encodeRequest([]string{"u1"}, nil, ""), encodeRequest(nil, nil, "")} {
		_, _ = call(conn, req)
	}
	got := s.DrainCalls()
	if len(got) != 2 || got[0].Method != path || got[0].Code != "OK" || got[0].Count != 2 || len(got[0].LatenciesMs) != 2 ||
		got[1].Code != "INVALID_ARGUMENT" || got[1].Count != 1 {
		t.Fatalf("%+v", got)
	}
	if again := s.DrainCalls(); len(again) != 0 {
		t.Fatalf("drained twice: %+v", again)
	}
}
