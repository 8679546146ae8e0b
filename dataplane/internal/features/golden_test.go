package features

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"math"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
)

// golden.json is written by testdata/golden.py from the Python FeatureService's own
// functions and Feast's: these tests hold the data plane to the same answers.
type golden struct {
	Repr  []struct{ Text, Repr, Shown string }
	Strip []struct {
		Text, Strip string
		Len         int
	}
	Float []struct {
		Value float64
		Repr  string
	}
	Validation []struct {
		IDs      []string `json:"ids"`
		Refs     []string
		JoinKey  string `json:"join_key"`
		Error    *string
		Resolved []string
	}
	Stored []struct {
		Raw   string
		Kind  string
		Value json.RawMessage
	}
	Cells []struct {
		Raw     string
		Seconds int64
		MaxAge  *float64 `json:"max_age"`
		Status  uint64
		Wire    string
	}
	Now      float64
	Response string
	Keys     []struct {
		JoinKey string `json:"join_key"`
		ID      string
		Key     string
	}
	Hashes []struct {
		Text  string
		Mmh3  uint32
		Field string
	}
	Times []struct {
		Seconds int64
		Nanos   int32
		Served  int64
		Raw     string
	}
}

func load(t *testing.T) *golden {
	t.Helper()
	raw, err := os.ReadFile("testdata/golden.json")
	if err != nil {
		t.Fatal(err)
	}
	var g golden
	if err := json.Unmarshal(raw, &g); err != nil {
		t.Fatal(err)
	}
	return &g
}

func unb64(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReprAndStripArePythons(t *testing.T) {
	g := load(t)
	if len(g.Repr) < 100 {
		t.Fatal("golden.json has too few repr cases")
	}
	for _, c := range g.Repr {
		if got := pyRepr(c.Text); got != c.Repr {
			t.Errorf("repr(%q) = %s, Python %s", c.Text, got, c.Repr)
		}
		if got := shown(c.Text); got != c.Shown {
			t.Errorf("shown(%q) = %s, Python %s", c.Text, got, c.Shown)
		}
	}
	for _, c := range g.Strip {
		if got := pyStrip(c.Text); got != c.Strip || pyLen(c.Text) != c.Len {
			t.Errorf("strip(%q) = %q (%d), Python %q (%d)", c.Text, got, pyLen(c.Text), c.Strip, c.Len)
		}
	}
	for _, c := range g.Float {
		if got := pyFloat(c.Value); got != c.Repr {
			t.Errorf("repr(%v) = %s, Python %s", c.Value, got, c.Repr)
		}
	}
}

func goldenCatalog() *catalog {
	hour, inf := 3600.0, (*float64)(nil)
	week := 7 * 24 * 3600.0
	return newCatalog(&config.Features{
		MaxEntities: 5, StoreTimeoutS: 10,
		Features: []config.Feature{
			{View: "activity", Name: "count_1h", JoinKey: "entity_id", MaxAgeS: &hour},
			{View: "activity", Name: "last_type", JoinKey: "entity_id", MaxAgeS: &hour},
			{View: "numeric", Name: "mean", JoinKey: "entity_id", MaxAgeS: &week},
			{View: "items", Name: "sold", JoinKey: "item_id", MaxAgeS: inf},
		},
	}, nil)
}

func TestValidationMessagesArePythons(t *testing.T) {
	g := load(t)
	c := goldenCatalog()
	for _, v := range g.Validation {
		err := c.validateEntityIDs(v.IDs)
		var specs []*spec
		if err == nil {
			jk := v.JoinKey
			if jk == "" {
				jk = PrimaryJoinKey
			}
			specs, err = c.resolve(v.Refs, jk)
		}
		switch {
		case v.Error == nil && err != nil:
			t.Errorf("%q %q %q: %v, Python accepts it", v.IDs, v.Refs, v.JoinKey, err)
		case v.Error != nil && (err == nil || err.Error() != *v.Error):
			t.Errorf("%q %q %q: %v, Python %q", v.IDs, v.Refs, v.JoinKey, err, *v.Error)
		case v.Error == nil:
			var refs []string
			for _, s := range specs {
				refs = append(refs, s.ref)
			}
			if strconv.Quote(joined(refs)) != strconv.Quote(joined(v.Resolved)) {
				t.Errorf("%q: resolved %q, Python %q", v.Refs, refs, v.Resolved)
			}
		}
	}
}

func joined(s []string) string {
	var b bytes.Buffer
	for _, x := range s {
		b.WriteString(x + "\x00")
	}
	return b.String()
}

func TestStoredValuesReadAsPython(t *testing.T) {
	g := load(t)
	for _, s := range g.Stored {
		v, err := parseValue(unb64(t, s.Raw))
		if err != nil {
			t.Fatal(err)
		}
		switch s.Kind {
		case "NoneType":
			if v.kind != null {
				t.Errorf("%s: %+v, want no value", s.Raw, v)
			}
		case "str":
			var want string
			_ = json.Unmarshal(s.Value, &want)
			if v.kind != text || v.text != want {
				t.Errorf("%s: %+v, want %q", s.Raw, v, want)
			}
		default: // int, float: Python serves float(value)
			want, err := pyNumber(s.Value)
			if err != nil {
				t.Fatal(err)
			}
			if v.kind != number || v.num != want {
				t.Errorf("%s: %+v, want %v", s.Raw, v, want)
			}
		}
	}
}

// pyNumber is float() of a JSON number as Python holds it (ints exactly, then rounded).
func pyNumber(raw json.RawMessage) (float64, error) {
	if i, err := strconv.ParseInt(string(raw), 10, 64); err == nil {
		return float64(i), nil
	}
	return strconv.ParseFloat(string(raw), 64)
}

func TestCellsEncodeAsPython(t *testing.T) {
	g := load(t)
	for _, c := range g.Cells {
		v, err := parseValue(unb64(t, c.Raw))
		if err != nil {
			t.Fatal(err)
		}
		age := math.Inf(1)
		if c.MaxAge != nil {
			age = *c.MaxAge
		}
		cl := cell{v: v, seconds: c.Seconds, status: statusOf(v, c.Seconds, age, g.Now)}
		if cl.status != c.Status {
			t.Errorf("%+v: status %d, Python %d", c, cl.status, c.Status)
		}
		if got, want := appendCell(nil, &cl), unb64(t, c.Wire); !bytes.Equal(got, want) || sizeCell(&cl) != len(want) {
			t.Errorf("%+v: %x, Python %x", c, got, want)
		}
	}
	one := cell{v: value{kind: number, num: 1}, seconds: 1_700_000_000, status: statusPresent}
	two := cell{v: value{kind: text, text: "t"}, status: statusPresent}
	got := appendResponse(nil, []string{"v:a", "v:b"}, []string{"e1", "é2", "e1"}, []cell{one, two, one, two, one, two})
	if want := unb64(t, g.Response); !bytes.Equal(got, want) {
		t.Errorf("response %x, Python %x", got, want)
	}
}

func TestKeysHashesAndTimesAreFeasts(t *testing.T) {
	g := load(t)
	for _, k := range g.Keys {
		if got := entityKey(k.JoinKey, k.ID); !bytes.Equal(got, unb64(t, k.Key)) {
			t.Errorf("key %s=%s: %x", k.JoinKey, k.ID, got)
		}
	}
	for _, h := range g.Hashes {
		if got := mmh3([]byte(h.Text)); got != h.Mmh3 {
			t.Errorf("mmh3(%q) = %d, want %d", h.Text, got, h.Mmh3)
		}
		if want := string(unb64(t, h.Field)); fieldOf(h.Text) != want {
			t.Errorf("field(%q) = %x, want %x", h.Text, fieldOf(h.Text), want)
		}
	}
	for _, tm := range g.Times {
		s, n, err := parseTimestamp(unb64(t, tm.Raw))
		if err != nil || s != tm.Seconds || n != tm.Nanos {
			t.Fatalf("%+v: %d %d %v", tm, s, n, err)
		}
		if got := redisSeconds(s, n); got != tm.Served {
			t.Errorf("%d.%09d served as %d, Feast %d", s, n, got, tm.Served)
		}
	}
}

func fieldOf(text string) string {
	view, feature, _ := strings.Cut(text, ":")
	if !strings.Contains(text, ":") {
		h := mmh3([]byte(text))
		return string([]byte{byte(h), byte(h >> 8), byte(h >> 16), byte(h >> 24)})
	}
	return redisField(view, feature)
}
