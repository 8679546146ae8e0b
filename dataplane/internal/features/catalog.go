// Package features serves loopmesh.v1.FeatureService/GetOnlineFeatures from the Feast
// online store (SQLite or Redis), answering exactly what the Python FeatureService answers
// (services/loopmesh/features/server.py and core.py): the same checks and INVALID_ARGUMENT
// messages naming the field, the same values (numbers and text), PRESENT/MISSING/STALE by
// the same max-age rule, event times to the second, duplicate entity ids answered twice.
// The control plane sends the schema and the store's location (config.Features).
package features

import (
	"math"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
)

// PrimaryJoinKey is the join key of requests that name none (loopmesh.mesh.events).
const PrimaryJoinKey = "entity_id"

type spec struct {
	ref     string
	view    string
	name    string
	joinKey string
	maxAge  float64 // +Inf: never stale
}

// catalog is a schema ready to serve: FeatureSchema's lookups, and the store to read.
type catalog struct {
	cfg         *config.Features
	specs       []spec
	byRef       map[string]*spec
	byJoinKey   map[string][]*spec
	knownKeys   string // "a, b" sorted, for the join_key message
	maxEntities int
	timeout     time.Duration
	timeoutText string // as Python prints store_timeout_s
	store       Store
}

func newCatalog(cfg *config.Features, store Store) *catalog {
	c := &catalog{
		cfg:         cfg,
		byRef:       map[string]*spec{},
		byJoinKey:   map[string][]*spec{},
		maxEntities: cfg.MaxEntities,
		timeout:     time.Duration(cfg.StoreTimeoutS * float64(time.Second)),
		timeoutText: pyFloat(cfg.StoreTimeoutS),
		store:       store,
	}
	c.specs = make([]spec, len(cfg.Features))
	for i, f := range cfg.Features {
		age := math.Inf(1)
		if f.MaxAgeS != nil {
			age = *f.MaxAgeS
		}
		c.specs[i] = spec{ref: f.View + ":" + f.Name, view: f.View, name: f.Name, joinKey: f.JoinKey, maxAge: age}
	}
	keys := []string{}
	for i := range c.specs {
		s := &c.specs[i]
		c.byRef[s.ref] = s
		if _, ok := c.byJoinKey[s.joinKey]; !ok {
			keys = append(keys, s.joinKey)
		}
		c.byJoinKey[s.joinKey] = append(c.byJoinKey[s.joinKey], s)
	}
	sort.Strings(keys)
	c.knownKeys = strings.Join(keys, ", ")
	if c.knownKeys == "" {
		c.knownKeys = "none"
	}
	return c
}

// requestError is loopmesh.features.core.RequestError: "<field>: <reason>".
type requestError struct{ field, reason string }

func (e *requestError) Error() string { return e.field + ": " + e.reason }

func itoa(n int) string { return strconv.Itoa(n) }

// validateEntityIDs is core.validate_entity_ids.
func (c *catalog) validateEntityIDs(ids []string) error {
	if len(ids) == 0 {
		return &requestError{"entity_ids", "at least one entity id is required"}
	}
	if len(ids) > c.maxEntities {
		return &requestError{"entity_ids", itoa(len(ids)) + " ids, at most " + itoa(c.maxEntities) + " per request"}
	}
	for i, id := range ids {
		field := "entity_ids[" + itoa(i) + "]"
		stripped := pyStrip(id)
		if stripped == "" {
			return &requestError{field, "must not be empty"}
		}
		if stripped != id {
			return &requestError{field, "must not start or end with whitespace"}
		}
		if pyLen(id) > maxEntityIDLength {
			return &requestError{field, "longer than " + itoa(maxEntityIDLength) + " characters"}
		}
	}
	return nil
}

// maxEntityIDLength is core.MAX_ENTITY_ID_LENGTH.
const maxEntityIDLength = 256

// resolve is core.FeatureSchema.resolve.
func (c *catalog) resolve(refs []string, joinKey string) ([]*spec, error) {
	all, ok := c.byJoinKey[joinKey]
	if !ok {
		return nil, &requestError{"join_key", "no view has join key " + shown(joinKey) + " (" + c.knownKeys + ")"}
	}
	if len(refs) == 0 {
		return all, nil
	}
	out := make([]*spec, len(refs))
	for i, ref := range refs {
		s := c.byRef[ref]
		field := "feature_refs[" + itoa(i) + "]"
		if s == nil {
			if strings.Contains(ref, ":") {
				return nil, &requestError{field, "unknown feature " + shown(ref)}
			}
			return nil, &requestError{field, shown(ref) + " is not a 'view:feature' reference"}
		}
		if s.joinKey != joinKey {
			return nil, &requestError{field, shown(ref) + " is keyed by " + s.joinKey + ", not " + shown(joinKey)}
		}
		out[i] = s
	}
	return out, nil
}

// statusOf is core.status_of: MISSING without a value, STALE when older than maxAge.
func statusOf(v value, seconds int64, maxAge, now float64) uint64 {
	if v.kind == null {
		return statusMissing
	}
	if seconds != 0 && float64(seconds) < now-maxAge {
		return statusStale
	}
	return statusPresent
}
