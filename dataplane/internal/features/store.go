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
	"strconv"
	"strings"
	"sync"
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
//
// Feast reads each view with "SELECT entity_key, feature_name, value, event_ts FROM <table>
// WHERE entity_key IN (...) ORDER BY entity_key" and keeps the event time of an entity's last
// row, which the primary key's index orders by feature_name. Here every view of a request is
// read by one statement (UNION ALL: one prepare, one read lock) with the same rows, and an
// entity's time is that of its greatest feature_name, as in Feast. Statements are prepared
// once per set of tables and size: the key list is padded to a power of two by repeating a
// key, which IN ignores.
type sqliteStore struct {
	db    *sql.DB
	mu    sync.Mutex
	stmts map[string]*sql.Stmt
}

// SQLite's default SQLITE_MAX_VARIABLE_NUMBER is 32766: statements stay below it.
const maxSQLiteArgs = 32000

// maxStatements bounds the prepared statements kept (sets of tables x sizes).
const maxStatements = 256

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
	return &sqliteStore{db: db, stmts: map[string]*sql.Stmt{}}, nil
}

func (s *sqliteStore) Kind() string { return "sqlite" }

func (s *sqliteStore) Close() error {
	s.mu.Lock()
	for _, st := range s.stmts {
		_ = st.Close()
	}
	s.stmts = nil
	s.mu.Unlock()
	return s.db.Close()
}

func quoteID(name string) string { return `"` + strings.ReplaceAll(name, `"`, `""`) + `"` }

// statement is the prepared UNION ALL of views' reads for size keys each; kept: it is in
// the cache (else the caller closes it).
func (s *sqliteStore) statement(ctx context.Context, views []viewRead, size int) (st *sql.Stmt, kept bool, err error) {
	var key strings.Builder
	key.WriteString(strconv.Itoa(size))
	for _, v := range views {
		key.WriteString("\x00" + v.view.Table)
	}
	s.mu.Lock()
	st, ok := s.stmts[key.String()]
	s.mu.Unlock()
	if ok {
		return st, true, nil
	}
	placeholders := strings.TrimSuffix(strings.Repeat("?,", size), ",")
	parts := make([]string, len(views))
	for i, v := range views {
		parts[i] = "SELECT " + strconv.Itoa(i) + ", entity_key, feature_name, value, CAST(event_ts AS INTEGER) FROM " +
			quoteID(v.view.Table) + " WHERE entity_key IN (" + placeholders + ")"
	}
	if st, err = s.db.PrepareContext(ctx, strings.Join(parts, " UNION ALL ")); err != nil {
		return nil, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stmts == nil || len(s.stmts) >= maxStatements {
		return st, false, nil
	}
	if other, ok := s.stmts[key.String()]; ok { // prepared meanwhile by another call
		_ = st.Close()
		return other, true, nil
	}
	s.stmts[key.String()] = st
	return st, true, nil
}

func (s *sqliteStore) Read(ctx context.Context, joinKey string, ids []string, views []viewRead) ([]viewRows, error) {
	size := 1
	for size < len(ids) {
		size *= 2
	}
	keys := make([]any, size)
	index := make(map[string]int, len(ids))
	for i, id := range ids {
		k := entityKey(joinKey, id)
		keys[i] = k
		index[string(k)] = i
	}
	for i := len(ids); i < size; i++ {
		keys[i] = keys[len(ids)-1]
	}
	out := make([]viewRows, len(views))
	columns := make([]map[string]int, len(views))
	for v, view := range views {
		out[v] = newRows(len(ids), len(view.features))
		columns[v] = make(map[string]int, len(view.features))
		for i, f := range view.features {
			columns[v][f] = i
		}
	}
	// The greatest feature_name seen per (view, entity), whose row gives the time.
	last := make([][]string, len(views))
	raw := make([][]sql.NullInt64, len(views))
	for v := range views {
		last[v] = make([]string, len(ids))
		raw[v] = make([]sql.NullInt64, len(ids))
	}
	per := max(1, maxSQLiteArgs/size)
	for first := 0; first < len(views); first += per {
		chunk := views[first:min(first+per, len(views))]
		args := make([]any, 0, size*len(chunk))
		for range chunk {
			args = append(args, keys...)
		}
		if err := s.query(ctx, chunk, size, args, func(v int, key []byte, feature string, value []byte, ts sql.NullInt64) error {
			v += first
			e, ok := index[string(key)]
			if !ok {
				return nil
			}
			if seen := last[v][e]; seen == "" || feature > seen {
				last[v][e], raw[v][e] = feature, ts
			}
			if f, ok := columns[v][feature]; ok {
				val, err := parseValue(value)
				if err != nil {
					return fmt.Errorf("%s: feature %s: %v", views[v].view.Table, feature, err)
				}
				out[v].values[e][f] = val
			}
			return nil
		}); err != nil {
			return nil, err
		}
	}
	for v := range views {
		for e := range ids {
			if last[v][e] != "" || raw[v][e].Valid {
				out[v].seconds[e] = sqliteSeconds(raw[v][e])
			}
		}
	}
	return out, nil
}

func (s *sqliteStore) query(ctx context.Context, views []viewRead, size int, args []any, each func(int, []byte, string, []byte, sql.NullInt64) error) error {
	st, kept, err := s.statement(ctx, views, size)
	if err != nil {
		return err
	}
	if !kept {
		defer st.Close()
	}
	rs, err := st.QueryContext(ctx, args...)
	if err != nil {
		return err
	}
	defer rs.Close()
	var v int
	var key, value []byte
	var feature string
	var ts sql.NullInt64
	for rs.Next() {
		if err := rs.Scan(&v, &key, &feature, &value, &ts); err != nil {
			return err
		}
		if err := each(v, key, feature, value, ts); err != nil {
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
