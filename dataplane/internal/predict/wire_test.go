package predict

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
)

// Little protobuf builders for the tests.

func fStr(num protowire.Number, s string) []byte {
	return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
}

func fBytes(num protowire.Number, parts ...[]byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), cat(parts...))
}

func fVarint(num protowire.Number, x uint64) []byte {
	return protowire.AppendVarint(protowire.AppendTag(nil, num, protowire.VarintType), x)
}

func fDouble(num protowire.Number, x float64) []byte {
	return protowire.AppendFixed64(protowire.AppendTag(nil, num, protowire.Fixed64Type), math.Float64bits(x))
}

func fFloat(num protowire.Number, x float32) []byte {
	return protowire.AppendFixed32(protowire.AppendTag(nil, num, protowire.Fixed32Type), math.Float32bits(x))
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var badUTF8 = string([]byte{0xff, 0xfe})

type requestCase struct {
	name string
	in   []byte
	want *Request
	err  error
}

func requestCases() []requestCase {
	ctxEntry := func(parts ...[]byte) []byte { return fBytes(2, parts...) }
	catEntry := func(parts ...[]byte) []byte { return fBytes(6, parts...) }
	return []requestCase{
		{"empty", nil, &Request{}, nil},
		{"all fields", cat(fStr(1, "u1"), ctxEntry(fStr(1, "price"), fDouble(2, 3.5)), fStr(3, "ctr"),
			fStr(4, "2"), fStr(5, "r1"), catEntry(fStr(1, "country"), fStr(2, "FR"))),
			&Request{EntityID: "u1", Context: map[string]float64{"price": 3.5}, ModelName: "ctr",
				ModelVersion: "2", RequestID: "r1", Categorical: map[string]string{"country": "FR"}}, nil},
		{"later scalar wins", cat(fStr(1, "a"), fStr(3, "m1"), fStr(1, "b"), fStr(3, "m2")),
			&Request{EntityID: "b", ModelName: "m2"}, nil},
		{"later map entry wins", cat(ctxEntry(fStr(1, "x"), fDouble(2, 1)), ctxEntry(fStr(1, "y"), fDouble(2, 2)),
			ctxEntry(fStr(1, "x"), fDouble(2, 3)), catEntry(fStr(1, "c"), fStr(2, "A")), catEntry(fStr(1, "c"), fStr(2, "B"))),
			&Request{Context: map[string]float64{"x": 3, "y": 2}, Categorical: map[string]string{"c": "B"}}, nil},
		{"later field within an entry wins", ctxEntry(fStr(1, "a"), fDouble(2, 1), fStr(1, "b"), fDouble(2, 2)),
			&Request{Context: map[string]float64{"b": 2}}, nil},
		{"entry without key or value", cat(ctxEntry(fDouble(2, 4)), ctxEntry(fStr(1, "k")), catEntry(fStr(2, "v")), catEntry()),
			&Request{Context: map[string]float64{"": 4, "k": 0}, Categorical: map[string]string{"": ""}}, nil},
		{"wrong wire types are unknown fields", cat(fVarint(1, 7), fDouble(3, 1), fStr(1, "u"), fVarint(2, 1), fVarint(6, 1),
			fStr(99, "unknown"), fStr(98, badUTF8)), &Request{EntityID: "u"}, nil},
		{"an entry with an unknown field is left out", cat(ctxEntry(fStr(1, "p"), fDouble(2, 1)), ctxEntry(fStr(1, "p"), fDouble(2, 2), fVarint(3, 1)),
			ctxEntry(fStr(1, "q"), fVarint(2, 9)), ctxEntry(fVarint(1, 1), fStr(1, "r"), fDouble(2, 1.5)), ctxEntry(fStr(1, "g"), fDouble(2, 1), []byte{0x1b, 0x1c}),
			catEntry(fStr(1, "c"), fStr(2, "v"), fDouble(2, 2)), catEntry(fStr(1, "d"), fStr(2, "w"))),
			&Request{Context: map[string]float64{"p": 1}, Categorical: map[string]string{"d": "w"}}, nil},
		{"invalid UTF-8 in an entry left out", ctxEntry(fStr(1, badUTF8), fVarint(3, 1)), nil, pbwire.ErrMalformed},
		{"negative zero and NaN kept", ctxEntry(fStr(1, "z"), fDouble(2, math.Copysign(0, -1))),
			&Request{Context: map[string]float64{"z": math.Copysign(0, -1)}}, nil},
		{"invalid UTF-8 entity", fStr(1, badUTF8), nil, pbwire.ErrMalformed},
		{"invalid UTF-8 version", fStr(4, badUTF8), nil, pbwire.ErrMalformed},
		{"invalid UTF-8 context key", ctxEntry(fStr(1, badUTF8), fDouble(2, 1)), nil, pbwire.ErrMalformed},
		{"invalid UTF-8 categorical value", catEntry(fStr(1, "c"), fStr(2, badUTF8)), nil, pbwire.ErrMalformed},
		{"truncated", fStr(1, "entity")[:4], nil, pbwire.ErrMalformed},
		{"truncated entry", ctxEntry(fStr(1, "k"), fDouble(2, 1)[:5]), nil, pbwire.ErrMalformed},
		{"field number 0", []byte{0x02, 0x00}, nil, pbwire.ErrMalformed},
	}
}

func TestParseRequest(t *testing.T) {
	tests := requestCases()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRequest(tc.in)
			if !errors.Is(err, tc.err) || (tc.err != nil) != (err != nil) {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if tc.err == nil && !reflect.DeepEqual(got, tc.want) {
				if tc.name != "negative zero and NaN kept" || !math.Signbit(got.Context["z"]) {
					t.Fatalf("got %+v, want %+v", got, tc.want)
				}
			}
		})
	}
}

// Bytes from Python: loopmesh.gen.loopmesh.v1.inference_pb2.PredictResponse(...).SerializeToString().
const (
	// prediction_id="0123456789abcdef0123456789abcdef", score=0.73, model_name="ctr",
	// model_version=3, degraded=True, defaulted_features=["price", "", "entity_activity:f0"],
	// arm="canary", request_id="r-1", task="multiclass", probabilities=[0.1, 0.73, 0.17],
	// predicted_class=1
	goldenResponseFull = "0a203031323334353637383961626364656630313233343536373839616263646566115c8fc2f5285ce73f" +
		"1a03637472200328013205707269636532003212656e746974795f61637469766974793a66303a0663616e617279" +
		"4203722d31520a6d756c7469636c6173735a189a9999999999b93f5c8fc2f5285ce73fc3f5285c8fc2c53f6001"
	// score=-0.0, model_version=-2, predicted_class=-1, task="é"
	goldenResponseNeg = "11000000000000008020feffffffffffffffff015202c3a960ffffffffffffffffff01"
)

func fullResponse() *Response {
	return &Response{PredictionID: "0123456789abcdef0123456789abcdef", Score: 0.73, ModelName: "ctr",
		ModelVersion: 3, Degraded: true, DefaultedFeatures: []string{"price", "", "entity_activity:f0"},
		Arm: "canary", RequestID: "r-1", Task: "multiclass", Probabilities: []float64{0.1, 0.73, 0.17},
		PredictedClass: 1}
}

func TestResponseMarshalGolden(t *testing.T) {
	tests := []struct {
		name string
		r    *Response
		want string
	}{
		{"full", fullResponse(), goldenResponseFull},
		{"negative", &Response{Score: math.Copysign(0, -1), ModelVersion: -2, PredictedClass: -1, Task: "é"}, goldenResponseNeg},
		{"empty", &Response{}, ""},
		{"empty slices", &Response{DefaultedFeatures: []string{}, Probabilities: []float64{}}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.r.Marshal()
			if hex.EncodeToString(got) != tc.want {
				t.Fatalf("got  %x\nwant %s", got, tc.want)
			}
			if cap(got) != len(got) {
				t.Fatalf("size computed %d, wrote %d", cap(got), len(got))
			}
		})
	}
}

// decodeResponse reads a PredictResponse back with protowire, independently of Marshal.
func decodeResponse(t *testing.T, b []byte) *Response {
	t.Helper()
	r := &Response{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatal("bad tag")
		}
		b = b[n:]
		switch typ {
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				t.Fatal("bad bytes")
			}
			b = b[n:]
			switch num {
			case 1:
				r.PredictionID = string(v)
			case 3:
				r.ModelName = string(v)
			case 6:
				r.DefaultedFeatures = append(r.DefaultedFeatures, string(v))
			case 7:
				r.Arm = string(v)
			case 8:
				r.RequestID = string(v)
			case 10:
				r.Task = string(v)
			case 11:
				for len(v) > 0 {
					x, n := protowire.ConsumeFixed64(v)
					if n < 0 {
						t.Fatal("bad packed double")
					}
					r.Probabilities = append(r.Probabilities, math.Float64frombits(x))
					v = v[n:]
				}
			default:
				t.Fatalf("unexpected field %d", num)
			}
		case protowire.Fixed64Type:
			x, n := protowire.ConsumeFixed64(b)
			if n < 0 || num != 2 {
				t.Fatalf("bad field %d", num)
			}
			b = b[n:]
			r.Score = math.Float64frombits(x)
		case protowire.VarintType:
			x, n := protowire.ConsumeVarint(b)
			if n < 0 {
				t.Fatal("bad varint")
			}
			b = b[n:]
			switch num {
			case 4:
				r.ModelVersion = int64(x)
			case 5:
				r.Degraded = x != 0
			case 12:
				r.PredictedClass = int32(x)
			default:
				t.Fatalf("unexpected field %d", num)
			}
		default:
			t.Fatalf("unexpected wire type %d", typ)
		}
	}
	return r
}

func TestResponseRoundTrip(t *testing.T) {
	for _, r := range []*Response{
		fullResponse(),
		{Score: 1, ModelName: "m", ModelVersion: math.MaxInt64, Arm: "stable", Task: "binary"},
		{Score: -2.5, ModelVersion: math.MinInt64, PredictedClass: math.MinInt32, Probabilities: []float64{0}},
		{DefaultedFeatures: []string{"a"}, PredictedClass: math.MaxInt32},
	} {
		got := decodeResponse(t, r.Marshal())
		if !reflect.DeepEqual(got, r) {
			t.Fatalf("got %+v, want %+v", got, r)
		}
	}
}

func TestEncodeInferRequest(t *testing.T) {
	// tritonclient's service_pb2.ModelInferRequest as TritonPool.score_rows builds it for
	// model "ctr", version 12 and rows [[1.5, -2, 0], [3.25, 1e-3, 7]] (float32).
	const want = "0a03637472120231322a140a08494e5055545f5f301204465033321a020203320b0a094f55545055545f5f30" +
		"3a180000c03f000000c000000000000050406f12833a0000e040"
	got := encodeInferRequest("ctr", 12, []float32{1.5, -2, 0, 3.25, 1e-3, 7}, 2, 3)
	if hex.EncodeToString(got) != want {
		t.Fatalf("got  %x\nwant %s", got, want)
	}
	if cap(got) != len(got) {
		t.Fatalf("size computed %d, wrote %d", cap(got), len(got))
	}
	// Big enough for multi-byte lengths.
	rows := make([]float32, 300*64)
	b := encodeInferRequest("m", 1, rows, 300, 64)
	if cap(b) != len(b) {
		t.Fatalf("size computed %d, wrote %d", cap(b), len(b))
	}
}

// Output tensors and answers for parseInferResponse.

func shapeField(dims ...int64) []byte {
	var v []byte
	for _, d := range dims {
		v = protowire.AppendVarint(v, uint64(d))
	}
	return fBytes(3, v)
}

func output(name, datatype string, extra ...[]byte) []byte {
	return fBytes(5, append([][]byte{fStr(1, name), fStr(2, datatype)}, extra...)...)
}

func rawFP32(xs ...float32) []byte {
	var b []byte
	for _, x := range xs {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return fBytes(6, b)
}

func rawFP64(xs ...float64) []byte {
	var b []byte
	for _, x := range xs {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(x))
	}
	return fBytes(6, b)
}

func TestParseInferResponse(t *testing.T) {
	packedFP32 := func(xs ...float32) []byte {
		var b []byte
		for _, x := range xs {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
		}
		return fBytes(5, fBytes(6, b))
	}
	tests := []struct {
		name  string
		in    []byte
		nRows int
		want  [][]float64
		err   string // substring; "malformed" for pbwire.ErrMalformed
	}{
		{"raw FP32", cat(fStr(1, "ctr"), fStr(2, "1"), output("OUTPUT__0", "FP32", shapeField(2, 1)), rawFP32(0.25, 0.75)),
			2, [][]float64{{0.25}, {0.75}}, ""},
		{"raw FP64, k=3", cat(output("OUTPUT__0", "FP64", shapeField(2, 3)), rawFP64(1, 2, 3, 4, 5, 6)),
			2, [][]float64{{1, 2, 3}, {4, 5, 6}}, ""},
		{"one dimension", cat(output("OUTPUT__0", "FP32", shapeField(3)), rawFP32(1, 2, 3)),
			3, [][]float64{{1}, {2}, {3}}, ""},
		{"raw at the output's index", cat(output("other", "INT32", shapeField(2)), output("OUTPUT__0", "FP32", shapeField(2, 1)),
			rawFP32(9, 9), rawFP32(0.5, 1.5)), 2, [][]float64{{0.5}, {1.5}}, ""},
		{"raw before outputs", cat(rawFP32(8), rawFP32(0.5), output("x", "FP32", shapeField(1)), output("OUTPUT__0", "FP32", shapeField(1))),
			1, [][]float64{{0.5}}, ""},
		{"first output of the name wins", cat(output("OUTPUT__0", "FP32", shapeField(1, 1)), output("OUTPUT__0", "FP64", shapeField(1, 1)),
			rawFP32(2), rawFP64(3)), 1, [][]float64{{2}}, ""},
		{"typed fp32 packed", output("OUTPUT__0", "FP32", shapeField(2, 1), packedFP32(0.5, 0.25)),
			2, [][]float64{{0.5}, {0.25}}, ""},
		{"typed fp32 unpacked, two records merged", output("OUTPUT__0", "FP32", shapeField(2, 1),
			fBytes(5, fFloat(6, 1)), fBytes(5, fFloat(6, 2))), 2, [][]float64{{1}, {2}}, ""},
		{"typed fp64", output("OUTPUT__0", "FP64", shapeField(1, 2), fBytes(5, fDouble(7, 1), fDouble(7, 2))),
			1, [][]float64{{1, 2}}, ""},
		{"unpacked shape", cat(output("OUTPUT__0", "FP32", fVarint(3, 2), fVarint(3, 1)), rawFP32(1, 2)),
			2, [][]float64{{1}, {2}}, ""},
		{"later name and datatype win", cat(fBytes(5, fStr(1, "x"), fStr(2, "INT8"), fStr(1, "OUTPUT__0"), fStr(2, "FP32"), shapeField(1)),
			rawFP32(4)), 1, [][]float64{{4}}, ""},
		{"missing output", cat(output("scores", "FP32", shapeField(2, 1)), rawFP32(1, 2)), 2, nil, "answered None for 2 rows"},
		{"no outputs", nil, 1, nil, "answered None for 1 rows"},
		{"INT32", cat(output("OUTPUT__0", "INT32", shapeField(1)), fBytes(6, []byte{1, 0, 0, 0})), 1, nil, "answered datatype 'INT32' for 1 rows"},
		{"BYTES", output("OUTPUT__0", "BYTES", shapeField(1)), 1, nil, "datatype 'BYTES'"},
		{"typed contents of another type", output("OUTPUT__0", "FP32", shapeField(1, 1), fBytes(5, fDouble(7, 1))), 1, nil, "answered (1, 1) holding 0 values for 1 rows"},
		{"wrong first dimension", cat(output("OUTPUT__0", "FP32", shapeField(3, 1)), rawFP32(1, 2, 3)), 2, nil, "answered (3, 1) for 2 rows"},
		{"scalar", cat(output("OUTPUT__0", "FP32"), rawFP32(1)), 1, nil, "answered () for 1 rows"},
		{"no values", cat(output("OUTPUT__0", "FP32", shapeField(2, 0)), rawFP32()), 2, nil, "answered (2, 0) for 2 rows"},
		{"shape and values disagree", cat(output("OUTPUT__0", "FP32", shapeField(2, 2)), rawFP32(1, 2)), 2, nil, "answered (2, 2) holding 2 values for 2 rows"},
		{"negative dimension", cat(output("OUTPUT__0", "FP32", shapeField(2, -1)), rawFP32(1, 2)), 2, nil, "answered (2, -1) holding 2 values"},
		{"huge dimensions", cat(output("OUTPUT__0", "FP32", shapeField(1<<40, 1<<40)), rawFP32(1, 2)), 2, nil, "holding 2 values"},
		{"raw not a multiple of 4", cat(output("OUTPUT__0", "FP32", shapeField(1)), fBytes(6, []byte{1, 2, 3})), 1, nil, "answered 3 raw bytes of FP32 for 1 rows"},
		{"raw not a multiple of 8", cat(output("OUTPUT__0", "FP64", shapeField(1)), fBytes(6, []byte{1, 2, 3, 4})), 1, nil, "answered 4 raw bytes of FP64"},
		{"packed fp32 not a multiple of 4", output("OUTPUT__0", "FP32", shapeField(1), fBytes(5, fBytes(6, []byte{1, 2}))), 1, nil, "malformed"},
		{"truncated", cat(output("OUTPUT__0", "FP32", shapeField(1)), rawFP32(1))[:10], 1, nil, "malformed"},
		{"invalid UTF-8 output name", cat(output(badUTF8, "FP32", shapeField(1)), rawFP32(1)), 1, nil, "malformed"},
		{"invalid UTF-8 model name", cat(fStr(1, badUTF8), output("OUTPUT__0", "FP32", shapeField(1)), rawFP32(1)), 1, nil, "malformed"},
		{"invalid UTF-8 parameter", cat(fBytes(4, fStr(1, "k"), fBytes(2, fStr(3, badUTF8))), output("OUTPUT__0", "FP32", shapeField(1)), rawFP32(1)), 1, nil, "malformed"},
		{"malformed other output", cat(fBytes(5, fStr(1, "x"), []byte{0x1a, 0x05, 0x01}), output("OUTPUT__0", "FP32", shapeField(1)), rawFP32(1)), 1, nil, "malformed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseInferResponse(tc.in, tc.nRows)
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.err == "malformed":
				if !errors.Is(err, pbwire.ErrMalformed) {
					t.Fatalf("error %v, want malformed", err)
				}
			case tc.err != "":
				var ae *answerError
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want an answerError with %q", err, tc.err)
				}
			default:
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func TestParseInferResponseRowsDoNotOverlap(t *testing.T) {
	rows, err := parseInferResponse(cat(output("OUTPUT__0", "FP32", shapeField(2, 2)), rawFP32(1, 2, 3, 4)), 2)
	if err != nil {
		t.Fatal(err)
	}
	rows[0] = append(rows[0], 99)
	if rows[1][0] != 3 {
		t.Fatalf("appending to a row wrote into the next: %v", rows)
	}
}

type indexCase struct {
	name string
	in   []byte
	want map[string][]int64
	err  bool
}

func indexCases() []indexCase {
	model := func(name, version, state string) []byte {
		return fBytes(1, fStr(1, name), fStr(2, version), fStr(3, state), fStr(4, "why"))
	}
	return []indexCase{
		{"ready ones, sorted", cat(model("ctr", "3", "READY"), model("ctr", "1", "READY"), model("ctr", "2", "UNAVAILABLE"),
			model("ctr", "10", "READY"), model("rank", "1", "READY"), model("ens", "", "READY"), model("x", "v1", "READY"),
			model("y", "-1", "READY"), model("z", "99999999999999999999", "READY"), model("w", "1", "ready")),
			map[string][]int64{"ctr": {1, 3, 10}, "rank": {1}}, false},
		{"later field wins", fBytes(1, fStr(1, "a"), fStr(2, "1"), fStr(3, "LOADING"), fStr(1, "b"), fStr(3, "READY")),
			map[string][]int64{"b": {1}}, false},
		{"empty", nil, map[string][]int64{}, false},
		{"unknown and wrong-typed fields", cat(fVarint(1, 3), fBytes(1, fVarint(1, 1), fStr(1, "m"), fStr(2, "4"), fStr(3, "READY"), fStr(9, "x"))),
			map[string][]int64{"m": {4}}, false},
		{"invalid UTF-8", model("ctr", "1", badUTF8), nil, true},
		{"invalid UTF-8 reason", fBytes(1, fStr(4, badUTF8)), nil, true},
		{"truncated", model("ctr", "1", "READY")[:6], nil, true},
	}
}

func TestRepositoryIndex(t *testing.T) {
	if got := hex.EncodeToString(encodeRepositoryIndexRequest()); got != "1001" { // Python: RepositoryIndexRequest(ready=True)
		t.Fatalf("request %s", got)
	}
	tests := indexCases()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseRepositoryIndex(tc.in)
			if tc.err {
				if !errors.Is(err, pbwire.ErrMalformed) {
					t.Fatalf("error %v, want malformed", err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %v %v, want %v", got, err, tc.want)
			}
		})
	}
}

func TestEncodeFeaturesRequest(t *testing.T) {
	// Python: GetOnlineFeaturesRequest(entity_ids=["u1","u2"], feature_refs=["v:a","v:b"]).
	got := encodeFeaturesRequest([]string{"u1", "u2"}, []string{"v:a", "v:b"})
	if hex.EncodeToString(got) != "0a0275310a0275321203763a611203763a62" {
		t.Fatalf("got %x", got)
	}
	if cap(got) != len(got) {
		t.Fatalf("size computed %d, wrote %d", cap(got), len(got))
	}
	if got := encodeFeaturesRequest([]string{""}, nil); hex.EncodeToString(got) != "0a00" {
		t.Fatalf("empty id: got %x", got)
	}
}

// Feature answers for parseFeaturesResponse.

func number(x float64) []byte { return fBytes(1, fDouble(1, x)) }
func text(s string) []byte    { return fBytes(1, fStr(2, s)) }

func fvalue(status uint64, parts ...[]byte) []byte {
	return fBytes(2, append(parts, fVarint(2, status))...)
}

func entity(id string, values ...[]byte) []byte {
	return fBytes(2, append([][]byte{fStr(1, id)}, values...)...)
}

type featuresCase struct {
	name string
	in   []byte
	want map[string]map[string]Reading
	err  string // "malformed" for pbwire.ErrMalformed
}

var featuresRefs = []string{"v:a", "v:b"}

func featuresCases() []featuresCase {
	ts := fBytes(3, fVarint(1, 1700000000), fVarint(2, 5))
	return []featuresCase{
		{"requested refs", cat(entity("u1", fvalue(1, number(0.5), ts), fvalue(3, text("FR")))),
			map[string]map[string]Reading{"u1": {"v:a": {Kind: KindNumber, Number: 0.5}, "v:b": {Kind: KindText, Text: "FR", Stale: true}}}, ""},
		{"the answer's refs", cat(fStr(1, "v:b"), fStr(1, "v:c"), fStr(1, "v:a"), entity("u1", fvalue(1, number(1)), fvalue(1, number(2)), fvalue(1, number(3)))),
			map[string]map[string]Reading{"u1": {"v:b": {Kind: KindNumber, Number: 1}, "v:c": {Kind: KindNumber, Number: 2}, "v:a": {Kind: KindNumber, Number: 3}}}, ""},
		{"statuses", cat(fStr(1, "p"), fStr(1, "m"), fStr(1, "u"), fStr(1, "s"), fStr(1, "n"), fStr(1, "x"),
			entity("e", fvalue(1, number(0)), fvalue(2, number(5)), fvalue(0, number(5)), fvalue(3), fvalue(1), fvalue(7, number(1)))),
			map[string]map[string]Reading{"e": {"p": {Kind: KindNumber}, "m": {}, "u": {}, "s": {Stale: true}, "n": {}, "x": {}}}, ""},
		{"value records merge: last member wins", cat(fStr(1, "a"), fStr(1, "b"), fStr(1, "c"), entity("e",
			fvalue(1, number(1), text("t")), fvalue(1, text("t"), number(2)), fvalue(1, number(3), fBytes(1)))),
			map[string]map[string]Reading{"e": {"a": {Kind: KindText, Text: "t"}, "b": {Kind: KindNumber, Number: 2}, "c": {Kind: KindNumber, Number: 3}}}, ""},
		{"later status wins", cat(fStr(1, "a"), entity("e", fBytes(2, number(4), fVarint(2, 2), fVarint(2, 1)))),
			map[string]map[string]Reading{"e": {"a": {Kind: KindNumber, Number: 4}}}, ""},
		{"later entity of the same id wins", cat(fStr(1, "a"), entity("e", fvalue(1, number(1))), entity("e", fvalue(1, number(2)))),
			map[string]map[string]Reading{"e": {"a": {Kind: KindNumber, Number: 2}}}, ""},
		{"entity id: later wins, missing is empty", cat(fStr(1, "a"), fBytes(2, fStr(1, "x"), fStr(1, "y"), fvalue(1, number(1))), fBytes(2, fvalue(1, number(2)))),
			map[string]map[string]Reading{"y": {"a": {Kind: KindNumber, Number: 1}}, "": {"a": {Kind: KindNumber, Number: 2}}}, ""},
		{"duplicate refs: the later value", cat(fStr(1, "a"), fStr(1, "a"), entity("e", fvalue(1, number(1)), fvalue(1, number(2)))),
			map[string]map[string]Reading{"e": {"a": {Kind: KindNumber, Number: 2}}}, ""},
		{"wrong-typed fields are unknown", cat(fVarint(1, 1), fVarint(2, 1), entity("e", fVarint(2, 9), fBytes(2, fBytes(2, []byte{1}), fVarint(1, 2), fDouble(2, 1), fFloat(3, 1)), fvalue(1, fBytes(1, fVarint(1, 5), fStr(1, "x"))))),
			map[string]map[string]Reading{"e": {"v:a": {}, "v:b": {}}}, ""},
		{"no entities", nil, map[string]map[string]Reading{}, ""},
		{"too few values", cat(entity("u1", fvalue(1, number(1)), fvalue(1, number(2))), entity("it's", fvalue(1, number(1)))),
			nil, `feature service answered 1 values for 2 refs (entity "it's")`},
		{"too many values", entity("u\n1", fvalue(1), fvalue(1), fvalue(1)), nil, `feature service answered 3 values for 2 refs (entity 'u\n1')`},
		{"first bad entity in order", cat(fStr(1, "a"), entity("x"), entity("y", fvalue(1), fvalue(1))), nil, `answered 0 values for 1 refs (entity 'x')`},
		{"invalid UTF-8 text", entity("u1", fvalue(1, text(badUTF8)), fvalue(1)), nil, "malformed"},
		{"invalid UTF-8 entity", entity(badUTF8, fvalue(1), fvalue(1)), nil, "malformed"},
		{"invalid UTF-8 ref", fStr(1, badUTF8), nil, "malformed"},
		{"malformed event time", entity("u1", fvalue(1, number(1), fBytes(3, []byte{0x08})), fvalue(1)), nil, "malformed"},
		{"malformed before a count error", cat(entity("x"), entity("y", fvalue(1, text(badUTF8)))), nil, "malformed"},
		{"truncated", entity("u1", fvalue(1, number(1)), fvalue(1))[:9], nil, "malformed"},
	}
}

func TestParseFeaturesResponse(t *testing.T) {
	tests := featuresCases()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseFeaturesResponse(tc.in, featuresRefs)
			switch {
			case tc.err == "malformed":
				if !errors.Is(err, pbwire.ErrMalformed) {
					t.Fatalf("error %v, want malformed", err)
				}
			case tc.err != "":
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
			case err != nil:
				t.Fatalf("error %v", err)
			case !reflect.DeepEqual(got, tc.want):
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestParseFeaturesResponsePython reads an answer serialized by Python's features_pb2.
func TestParseFeaturesResponsePython(t *testing.T) {
	got, err := parseFeaturesResponse(unhex(t, goldenFeatures), []string{"v:a", "v:b", "v:c"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]map[string]Reading{
		"u1": {"v:a": {Kind: KindNumber, Number: 1.5}, "v:b": {Kind: KindText, Text: "FR", Stale: true}, "v:c": {}},
		"u2": {"v:a": {}, "v:b": {Stale: true}, "v:c": {Kind: KindNumber, Number: -3}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

// features_pb2.GetOnlineFeaturesResponse with entities u1 (number 1.5 PRESENT with an event
// time, text "FR" STALE, number 2 MISSING) and u2 (PRESENT without value, STALE without
// value, number -3 PRESENT), no feature_refs.
const goldenFeatures = "12360a02753112170a0909000000000000f83f10011a080880e2cfaa06100712080a04120246521003120d0a0909" +
	"00000000000000401002121b0a0275321202100112021003120d0a090900000000000008c01001"
