package features

import (
	"context"
	"crypto/tls"
	"database/sql"
	"fmt"
	"math"
	"net"
	"net/url"
	"runtime"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver, pure Go

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
)

// viewRead asks one view's rows: the requested features of the view (each once).
type viewRead struct {
	view     config.View
	features []string
}

// viewRows is what the store holds of one view for each entity (in request order): the
// row's event time in whole seconds (0: no row, or no time) and the requested features'
// values (null where absent).
type viewRows struct {
	seconds []int64
	values  [][]value // [entity][feature]
}

// Store reads rows of the Feast online store exactly as Feast's own online_read does.
type Store interface {
	// Read the rows of views for the (distinct) entity ids of joinKey.
	Read(ctx context.Context, joinKey string, ids []string, views []viewRead) ([]viewRows, error)
	Close() error
	// Kind names the store in metrics ("sqlite", "redis").
	Kind() string
}

// Open connects to the configured online store (lazily: nothing is read yet).
func Open(s config.Store) (Store, error) {
	switch s.Type {
	case "sqlite":
		return openSQLite(s.Path)
	case "redis":
		return openRedis(s)
	}
	return nil, fmt.Errorf("store.type: %q", s.Type)
}

func newRows(n, features int) viewRows {
	r := viewRows{seconds: make([]int64, n), values: make([][]value, n)}
	flat := make([]value, n*features)
	for i := range r.values {
		r.values[i] = flat[i*features : (i+1)*features : (i+1)*features]
	}
	return r
}

// ------------------------------------------------------------------------------ SQLite

// sqliteStore reads Feast's SQLite file through its own read-only connections; Feast
// writes it from the Python process. One table per view: (entity_key BLOB, feature_name
// TEXT, value BLOB (a serialized feast Value), event_ts, ...), keyed by (entity_key,
// feature_name) (feast/infra/online_stores/sqlite.py).
type sqliteStore struct {
	db *sql.DB
}

func openSQLite(path string) (*sqliteStore, error) {
	// mode=ro: never writes, never creates the file. busy_timeout: waits out Feast's write
	// transactions (a rollback-journal writer holds an exclusive lock while it commits).
	dsn := (&url.URL{Scheme: "file", Path: path, RawQuery: "mode=ro&_pragma=busy_timeout(5000)&_pragma=query_only(1)"}).String()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	n := 2 * runtime.GOMAXPROCS(0)
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	return &sqliteStore{db: db}, nil
}

func (s *sqliteStore) Kind() string { return "sqlite" }
func (s *sqliteStore) Close() error { return s.db.Close() }

func quoteID(name string) string { return `"` + strings.ReplaceAll(name, `"`, `""`) + `"` }

func (s *sqliteStore) Read(ctx context.Context, joinKey string, ids []string, views []viewRead) ([]viewRows, error) {
	keys := make([]any, len(ids))
	index := make(map[string]int, len(ids))
	for i, id := range ids {
		k := entityKey(joinKey, id)
		keys[i] = k
		index[string(k)] = i
	}
	placeholders := strings.TrimSuffix(strings.Repeat("?,", len(ids)), ",")
	out := make([]viewRows, len(views))
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	for v, view := range views {
		rows := newRows(len(ids), len(view.features))
		column := make(map[string]int, len(view.features))
		for i, f := range view.features {
			column[f] = i
		}
		// Feast's own query; the last row of an entity gives its time, as in Feast.
		q := "SELECT entity_key, feature_name, value, CAST(event_ts AS INTEGER) FROM " + quoteID(view.view.Table) +
			" WHERE entity_key IN (" + placeholders + ") ORDER BY entity_key"
		if err := s.query(ctx, conn, q, keys, func(key []byte, feature string, raw []byte, ts sql.NullInt64) error {
			e, ok := index[string(key)]
			if !ok {
				return nil
			}
			rows.seconds[e] = sqliteSeconds(ts)
			if f, ok := column[feature]; ok {
				val, err := parseValue(raw)
				if err != nil {
					return fmt.Errorf("%s: feature %s: %v", view.view.Table, feature, err)
				}
				rows.values[e][f] = val
			}
			return nil
		}); err != nil {
			return nil, err
		}
		out[v] = rows
	}
	return out, nil
}

func (s *sqliteStore) query(ctx context.Context, conn *sql.Conn, q string, args []any, each func([]byte, string, []byte, sql.NullInt64) error) error {
	rs, err := conn.QueryContext(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rs.Close()
	var key, raw []byte
	var feature string
	var ts sql.NullInt64
	for rs.Next() {
		if err := rs.Scan(&key, &feature, &raw, &ts); err != nil {
			return err
		}
		if err := each(key, feature, raw, ts); err != nil {
			return err
		}
	}
	return rs.Err()
}

// sqliteSeconds is the event time Feast reads back from event_ts: it stores
// int(naive_utc.timestamp()), so the UTC wall clock taken as local time, and reads it with
// datetime.fromtimestamp (local wall clock) taken as UTC. In a UTC process both are the
// plain epoch seconds; elsewhere the local offset cancels out the same way here.
func sqliteSeconds(ts sql.NullInt64) int64 {
	if !ts.Valid {
		return 0
	}
	_, offset := time.Unix(ts.Int64, 0).In(time.Local).Zone()
	return ts.Int64 + int64(offset)
}

// ------------------------------------------------------------------------------- Redis

// redisStore reads Feast's Redis layout: one hash per entity at <serialized entity
// key><project>, a feature at mmh3("<view>:<feature>"), the view's row time at
// "_ts:<view>" (a serialized Timestamp) (feast/infra/online_stores/redis.py).
type redisStore struct {
	client  *redis.Client
	project string
}

func openRedis(s config.Store) (*redisStore, error) {
	r := s.Redis
	opts := &redis.Options{
		Addr:                  r.Address,
		DB:                    r.DB,
		ContextTimeoutEnabled: true,
		DisableIdentity:       true,
		PoolSize:              4 * runtime.GOMAXPROCS(0),
		MinIdleConns:          1,
	}
	if r.Username != nil {
		opts.Username = *r.Username
	}
	if r.Password != nil {
		opts.Password = *r.Password
	}
	if r.TLS {
		host, _, _ := net.SplitHostPort(r.Address)
		// As redis-py's ssl=True: the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR too), the
		// host name checked.
		opts.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	return &redisStore{client: redis.NewClient(opts), project: s.Project}, nil
}

func (s *redisStore) Kind() string { return "redis" }
func (s *redisStore) Close() error { return s.client.Close() }

func (s *redisStore) Read(ctx context.Context, joinKey string, ids []string, views []viewRead) ([]viewRows, error) {
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = string(entityKey(joinKey, id)) + s.project
	}
	pipe := s.client.Pipeline()
	cmds := make([][]*redis.SliceCmd, len(views))
	for v, view := range views {
		fields := make([]string, 0, len(view.features)+1)
		for _, f := range view.features {
			fields = append(fields, redisField(view.view.Name, f))
		}
		fields = append(fields, "_ts:"+view.view.Name)
		cmds[v] = make([]*redis.SliceCmd, len(keys))
		for e, key := range keys {
			cmds[v][e] = pipe.HMGet(ctx, key, fields...)
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, err
	}
	out := make([]viewRows, len(views))
	for v, view := range views {
		rows := newRows(len(ids), len(view.features))
		for e := range keys {
			got := cmds[v][e].Val()
			if len(got) != len(view.features)+1 {
				return nil, fmt.Errorf("redis: HMGET answered %d fields, asked %d", len(got), len(view.features)+1)
			}
			for f := range view.features {
				raw, ok := got[f].(string)
				if !ok || raw == "" {
					continue
				}
				val, err := parseValue([]byte(raw))
				if err != nil {
					return nil, fmt.Errorf("redis: %s:%s: %v", view.view.Name, view.features[f], err)
				}
				rows.values[e][f] = val
			}
			if raw, ok := got[len(view.features)].(string); ok && raw != "" {
				sec, nanos, err := parseTimestamp([]byte(raw))
				if err != nil {
					return nil, fmt.Errorf("redis: _ts:%s: %v", view.view.Name, err)
				}
				rows.seconds[e] = redisSeconds(sec, nanos)
			}
		}
		out[v] = rows
	}
	return out, nil
}

// redisSeconds is the whole seconds Feast serves for a stored Timestamp: it goes through
// datetime.fromtimestamp(seconds + nanos / 1e9), which rounds to the microsecond half to
// even, so a time a few hundred nanoseconds before a second reads as that second.
func redisSeconds(seconds int64, nanos int32) int64 {
	total := float64(seconds) + float64(nanos)/1e9
	whole, frac := math.Modf(total)
	us := math.RoundToEven(frac * 1e6)
	if us >= 1e6 {
		whole++
	} else if us < 0 {
		whole--
	}
	return int64(whole)
}
