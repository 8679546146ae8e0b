package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
)

// Features is what the features mode serves: the servable features in the control plane's
// order (loopmesh.features.core.FeatureSchema), the request limit and where the Feast
// online store is. The control plane sends it in the config and again (PUT /features on the
// admin API) whenever it changes.
type Features struct {
	MaxEntities   int       `json:"max_entities"`
	StoreTimeoutS float64   `json:"store_timeout_s"`
	Features      []Feature `json:"features"`
	// Views by name: where each view's rows are.
	Views map[string]View `json:"views"`
	Store Store           `json:"store"`
}

// Feature is one servable feature ("view:name").
type Feature struct {
	View    string `json:"view"`
	Name    string `json:"name"`
	Dtype   string `json:"dtype"`
	JoinKey string `json:"join_key"`
	// MaxAgeS: values older than this are STALE (the view's TTL, or the service's
	// stale_after_s); null: never (a view without a TTL).
	MaxAgeS *float64 `json:"max_age_s"`
}

// View locates one view's rows in the online store.
type View struct {
	// Table is the SQLite table (feast compute_table_id: "<project>_<view>[_v<N>]").
	Table string `json:"table"`
	// Name is the view's name in Redis hash fields ("_ts:<name>", mmh3("<name>:<feature>")).
	Name string `json:"name"`
}

// Store is the Feast online store: SQLite (a file, opened read-only) or Redis.
type Store struct {
	Type string `json:"type"`
	// Path of the SQLite file.
	Path string `json:"path"`
	// Project is appended to every Redis key (feast helpers._redis_key).
	Project string `json:"project"`
	Redis   *Redis `json:"redis"`
	// KeySerializationVersion is Feast's entity_key_serialization_version (only 3).
	KeySerializationVersion int `json:"entity_key_serialization_version"`
}

// Redis is where the Redis online store is and how to log in.
type Redis struct {
	Address  string  `json:"address"`
	DB       int     `json:"db"`
	Username *string `json:"username"`
	Password *string `json:"password"`
	TLS      bool    `json:"tls"`
}

// ParseFeatures reads a Features object (PUT /features), strictly like the config.
func ParseFeatures(body []byte) (*Features, error) {
	f := &Features{}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(f); err != nil {
		return nil, explainIn(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("more than one JSON value")
	}
	return f, f.Check()
}

func explainIn(err error) error {
	e := explain(err)
	msg := e.Error()
	if len(msg) > len("config: ") {
		msg = msg[len("config: "):]
	}
	return errors.New(msg)
}

// Check validates f; errors name the key at fault (relative to "features").
func (f *Features) Check() error {
	fail := func(key, format string, a ...any) error {
		return fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...))
	}
	if f.MaxEntities < 1 {
		return fail("max_entities", "%d is below 1", f.MaxEntities)
	}
	if !(f.StoreTimeoutS > 0) || math.IsInf(f.StoreTimeoutS, 0) {
		return fail("store_timeout_s", "%v is not a positive number", f.StoreTimeoutS)
	}
	if len(f.Features) == 0 {
		return fail("features", "no feature to serve")
	}
	seen := map[string]bool{}
	for i, ft := range f.Features {
		key := fmt.Sprintf("features[%d]", i)
		if ft.View == "" || ft.Name == "" || ft.JoinKey == "" {
			return fail(key, "view, name and join_key are required")
		}
		ref := ft.View + ":" + ft.Name
		if seen[ref] {
			return fail(key, "%q twice", ref)
		}
		seen[ref] = true
		if ft.MaxAgeS != nil && (math.IsNaN(*ft.MaxAgeS) || *ft.MaxAgeS <= 0) {
			return fail(key+".max_age_s", "%v is not positive", *ft.MaxAgeS)
		}
		if _, ok := f.Views[ft.View]; !ok {
			return fail(key+".view", "%q is not in views", ft.View)
		}
	}
	for name, v := range f.Views {
		if v.Table == "" || v.Name == "" {
			return fail("views."+name, "table and name are required")
		}
	}
	s := f.Store
	if s.KeySerializationVersion != 3 {
		return fail("store.entity_key_serialization_version", "%d: only 3 is read", s.KeySerializationVersion)
	}
	switch s.Type {
	case "sqlite":
		if s.Path == "" {
			return fail("store.path", "required for sqlite")
		}
		if s.Redis != nil {
			return fail("store.redis", "only for redis")
		}
	case "redis":
		if s.Redis == nil {
			return fail("store.redis", "required for redis")
		}
		if _, _, err := net.SplitHostPort(s.Redis.Address); err != nil {
			return fail("store.redis.address", "%q is not HOST:PORT", s.Redis.Address)
		}
		if s.Redis.DB < 0 {
			return fail("store.redis.db", "%d is negative", s.Redis.DB)
		}
	default:
		return fail("store.type", "%q is not \"sqlite\" or \"redis\"", s.Type)
	}
	return nil
}
