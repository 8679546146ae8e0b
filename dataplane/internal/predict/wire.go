// Package predict serves loopmesh.v1.InferenceService/Predict in the data plane: feature
// reads and Triton calls coalesced across concurrent requests, with every message read and
// written by hand (protowire), like the rest of the data plane.
package predict

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/oip"
	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
)

// Tensor names of the models the mesh builds (loopmesh.mesh.model_repo INPUT_NAME, OUTPUT_NAME).
const (
	inputName  = "INPUT__0"
	outputName = "OUTPUT__0"
)

// Request is what Predict reads of a loopmesh.v1.PredictRequest. Context and Categorical are
// nil when the request has no entry.
type Request struct {
	EntityID     string
	Context      map[string]float64
	ModelName    string
	ModelVersion string
	RequestID    string
	Categorical  map[string]string
}

// ParseRequest reads a serialized loopmesh.v1.PredictRequest as Python's protobuf (upb) does:
// the last value of a scalar field wins, a later map entry replaces an earlier one of the
// same key, an entry without key or value holds the zero value, a field of an unexpected
// wire type is an unknown field. A map entry holding an unknown field (or a known one of
// the wrong wire type) is left out of the map: upb keeps it as an unknown field of the
// request. Strings that are not UTF-8 make it pbwire.ErrMalformed.
func ParseRequest(b []byte) (*Request, error) {
	r := &Request{}
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			return pbwire.String(v, &r.EntityID)
		case 2:
			var key string
			var val float64
			known, err := mapEntry(v, &key, func(typ protowire.Type, _ []byte, x uint64) (bool, error) {
				val = math.Float64frombits(x)
				return typ == protowire.Fixed64Type, nil
			})
			if err != nil || !known {
				return err
			}
			if r.Context == nil {
				r.Context = make(map[string]float64)
			}
			r.Context[key] = val
		case 3:
			return pbwire.String(v, &r.ModelName)
		case 4:
			return pbwire.String(v, &r.ModelVersion)
		case 5:
			return pbwire.String(v, &r.RequestID)
		case 6:
			var key, val string
			known, err := mapEntry(v, &key, func(typ protowire.Type, v []byte, _ uint64) (bool, error) {
				if typ != protowire.BytesType {
					return false, nil
				}
				return true, pbwire.String(v, &val)
			})
			if err != nil || !known {
				return err
			}
			if r.Categorical == nil {
				r.Categorical = make(map[string]string)
			}
			r.Categorical[key] = val
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// mapEntry reads a map entry: its string key (field 1) into key and its value (field 2)
// through value, which says whether the wire type fits. known is false for an entry holding
// another field, or one of the wrong wire type: upb keeps such an entry as an unknown field.
func mapEntry(b []byte, key *string, value func(typ protowire.Type, v []byte, x uint64) (bool, error)) (known bool, err error) {
	known = true
	err = pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			return pbwire.String(v, key)
		case num == 2:
			fits, err := value(typ, v, x)
			known = known && fits
			return err
		}
		known = false
		return nil
	})
	return known, err
}

// Response is a loopmesh.v1.PredictResponse without its error (Go answers only successes).
type Response struct {
	PredictionID      string
	Score             float64
	ModelName         string
	ModelVersion      int64
	Degraded          bool
	DefaultedFeatures []string
	Arm               string
	RequestID         string
	Task              string
	Probabilities     []float64
	PredictedClass    int32
}

// Marshal encodes r as protobuf does for proto3: fields in number order, zero scalars left
// out (a -0.0 score is not zero: its bits are set), probabilities packed.
func (r *Response) Marshal() []byte {
	size := sizeString(1, r.PredictionID) + sizeString(3, r.ModelName) + sizeString(7, r.Arm) +
		sizeString(8, r.RequestID) + sizeString(10, r.Task)
	if math.Float64bits(r.Score) != 0 {
		size += 1 + 8
	}
	if r.ModelVersion != 0 {
		size += 1 + protowire.SizeVarint(uint64(r.ModelVersion))
	}
	if r.Degraded {
		size += 2
	}
	for _, f := range r.DefaultedFeatures {
		size += 1 + protowire.SizeBytes(len(f))
	}
	if n := len(r.Probabilities); n > 0 {
		size += 1 + protowire.SizeBytes(8*n)
	}
	if r.PredictedClass != 0 {
		size += 1 + protowire.SizeVarint(uint64(int64(r.PredictedClass)))
	}

	b := make([]byte, 0, size)
	b = appendString(b, 1, r.PredictionID)
	if math.Float64bits(r.Score) != 0 {
		b = protowire.AppendTag(b, 2, protowire.Fixed64Type)
		b = protowire.AppendFixed64(b, math.Float64bits(r.Score))
	}
	b = appendString(b, 3, r.ModelName)
	if r.ModelVersion != 0 {
		b = protowire.AppendTag(b, 4, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(r.ModelVersion))
	}
	if r.Degraded {
		b = protowire.AppendTag(b, 5, protowire.VarintType)
		b = protowire.AppendVarint(b, 1)
	}
	for _, f := range r.DefaultedFeatures { // repeated: every element, empty ones too
		b = protowire.AppendTag(b, 6, protowire.BytesType)
		b = protowire.AppendString(b, f)
	}
	b = appendString(b, 7, r.Arm)
	b = appendString(b, 8, r.RequestID)
	b = appendString(b, 10, r.Task)
	if n := len(r.Probabilities); n > 0 {
		b = protowire.AppendTag(b, 11, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(8*n))
		for _, p := range r.Probabilities {
			b = protowire.AppendFixed64(b, math.Float64bits(p))
		}
	}
	if r.PredictedClass != 0 { // int32: a negative value is sign-extended to ten bytes
		b = protowire.AppendTag(b, 12, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(int64(r.PredictedClass)))
	}
	return b
}

// sizeString is the size of a proto3 string field (nothing when empty).
func sizeString(num protowire.Number, s string) int {
	if s == "" {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeBytes(len(s))
}

// appendString writes a proto3 string field (nothing when empty).
func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	return protowire.AppendString(protowire.AppendTag(b, num, protowire.BytesType), s)
}

// encodeInferRequest builds the ModelInferRequest TritonPool.score_rows sends, byte for byte
// as Python serializes it: one FP32 input INPUT__0 of shape [nRows, width] whose raw
// contents are rows (nRows*width values, little-endian), one requested output OUTPUT__0.
func encodeInferRequest(model string, version int64, rows []float32, nRows, width int) []byte {
	ver := strconv.FormatInt(version, 10)
	var shape []byte
	shape = protowire.AppendVarint(shape, uint64(int64(nRows)))
	shape = protowire.AppendVarint(shape, uint64(int64(width)))
	tensorSize := sizeString(1, inputName) + sizeString(2, "FP32") + 1 + protowire.SizeBytes(len(shape))
	outSize := sizeString(1, outputName)
	rawSize := 4 * len(rows)

	size := sizeString(1, model) + sizeString(2, ver) +
		1 + protowire.SizeBytes(tensorSize) + 1 + protowire.SizeBytes(outSize) + 1 + protowire.SizeBytes(rawSize)
	b := make([]byte, 0, size)
	b = appendString(b, 1, model)
	b = appendString(b, 2, ver)
	b = protowire.AppendTag(b, 5, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(tensorSize))
	b = appendString(b, 1, inputName)
	b = appendString(b, 2, "FP32")
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, shape)
	b = protowire.AppendTag(b, 6, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(outSize))
	b = appendString(b, 1, outputName)
	b = protowire.AppendTag(b, 7, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(rawSize))
	for _, x := range rows {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

// answerError is an unusable ModelInferResponse: "answered <what> for <n> rows", where what
// is the output's shape as Python prints it (numpy's shape tuple, None when the output is
// missing) or what else was wrong with it.
type answerError struct {
	what string
	rows int
}

func (e *answerError) Error() string {
	return fmt.Sprintf("answered %s for %d rows", e.what, e.rows)
}

// outTensor is what parseInferResponse reads of an InferOutputTensor.
type outTensor struct {
	name     string
	datatype string
	shape    []int64
	fp32     []float32 // typed contents, merged over every contents record
	fp64     []float64
}

// parseInferResponse reads the OUTPUT__0 output of a ModelInferResponse for a request of
// nRows rows, as tritonclient's InferResult.as_numpy finds it (the first output of that
// name; its raw contents are raw_output_contents at its index among the outputs, else its
// typed contents): nRows rows of k values each, k = values / nRows. The output must be FP32
// or FP64, hold as many values as its shape says, with nRows as first dimension and at least
// one value; anything else is an *answerError.
func parseInferResponse(b []byte, nRows int) ([][]float64, error) {
	var (
		out    *outTensor
		index  int // of out among the outputs
		seen   int // outputs so far
		raw    [][]byte
		parsed outTensor
	)
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1, 2, 3:
			return pbwire.UTF8(v)
		case 4:
			return validParamEntry(v)
		case 5:
			var t outTensor
			if err := parseOutTensor(v, &t, false); err != nil {
				return err
			}
			if out == nil && t.name == outputName {
				parsed, index = outTensor{}, seen
				if err := parseOutTensor(v, &parsed, true); err != nil {
					return err
				}
				out = &parsed
			}
			seen++
		case 6:
			raw = append(raw, v)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if out == nil {
		return nil, &answerError{"None", nRows}
	}
	var values []float64
	switch out.datatype {
	case "FP32":
		if index < len(raw) {
			r := raw[index]
			if len(r)%4 != 0 {
				return nil, &answerError{fmt.Sprintf("%d raw bytes of FP32", len(r)), nRows}
			}
			values = make([]float64, len(r)/4)
			for i := range values {
				values[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(r[4*i:])))
			}
		} else {
			values = make([]float64, len(out.fp32))
			for i, x := range out.fp32 {
				values[i] = float64(x)
			}
		}
	case "FP64":
		if index < len(raw) {
			r := raw[index]
			if len(r)%8 != 0 {
				return nil, &answerError{fmt.Sprintf("%d raw bytes of FP64", len(r)), nRows}
			}
			values = make([]float64, len(r)/8)
			for i := range values {
				values[i] = math.Float64frombits(binary.LittleEndian.Uint64(r[8*i:]))
			}
		} else {
			values = out.fp64
		}
	default:
		return nil, &answerError{"datatype " + oip.PyRepr(out.datatype), nRows}
	}
	shape := pyShape(out.shape)
	if !shapeHolds(out.shape, len(values)) {
		return nil, &answerError{fmt.Sprintf("%s holding %d values", shape, len(values)), nRows}
	}
	if len(out.shape) == 0 || out.shape[0] != int64(nRows) || len(values) == 0 || nRows <= 0 {
		return nil, &answerError{shape, nRows}
	}
	k := len(values) / nRows
	rows := make([][]float64, nRows)
	for i := range rows {
		rows[i] = values[i*k : (i+1)*k : (i+1)*k]
	}
	return rows, nil
}

// shapeHolds says whether shape (no negative dimension) has n elements.
func shapeHolds(shape []int64, n int) bool {
	for _, d := range shape {
		if d < 0 {
			return false
		}
	}
	if slices.Contains(shape, 0) {
		return n == 0
	}
	p := int64(1)
	for _, d := range shape {
		if p > int64(n)/d { // p*d > n, without overflow
			return false
		}
		p *= d
	}
	return p == int64(n)
}

// pyShape prints a shape as Python prints a tuple: (), (3,), (3, 1).
func pyShape(shape []int64) string {
	var s strings.Builder
	s.WriteByte('(')
	for i, d := range shape {
		if i > 0 {
			s.WriteString(", ")
		}
		s.WriteString(strconv.FormatInt(d, 10))
	}
	if len(shape) == 1 {
		s.WriteByte(',')
	}
	s.WriteByte(')')
	return s.String()
}

// parseOutTensor reads an InferOutputTensor into t; its typed contents are decoded only
// when full (else only checked, as a protobuf parser would).
func parseOutTensor(b []byte, t *outTensor, full bool) error {
	return pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 3 && typ == protowire.VarintType:
			t.shape = append(t.shape, int64(x))
		case num == 3 && typ == protowire.BytesType: // packed shape
			for len(v) > 0 {
				d, n := protowire.ConsumeVarint(v)
				if n < 0 {
					return pbwire.ErrMalformed
				}
				t.shape = append(t.shape, int64(d))
				v = v[n:]
			}
		case typ != protowire.BytesType:
		case num == 1:
			return pbwire.String(v, &t.name)
		case num == 2:
			return pbwire.String(v, &t.datatype)
		case num == 4:
			return validParamEntry(v)
		case num == 5:
			return parseContents(v, t, full)
		}
		return nil
	})
}

// parseContents reads fp32_contents (6) and fp64_contents (7) of an InferTensorContents,
// packed or not, into t when keep; the other fields are only checked.
func parseContents(b []byte, t *outTensor, keep bool) error {
	return pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 6 && typ == protowire.Fixed32Type:
			if keep {
				t.fp32 = append(t.fp32, math.Float32frombits(uint32(x)))
			}
		case num == 6 && typ == protowire.BytesType:
			if len(v)%4 != 0 {
				return pbwire.ErrMalformed
			}
			for ; keep && len(v) > 0; v = v[4:] {
				t.fp32 = append(t.fp32, math.Float32frombits(binary.LittleEndian.Uint32(v)))
			}
		case num == 7 && typ == protowire.Fixed64Type:
			if keep {
				t.fp64 = append(t.fp64, math.Float64frombits(x))
			}
		case num == 7 && typ == protowire.BytesType:
			if len(v)%8 != 0 {
				return pbwire.ErrMalformed
			}
			for ; keep && len(v) > 0; v = v[8:] {
				t.fp64 = append(t.fp64, math.Float64frombits(binary.LittleEndian.Uint64(v)))
			}
		case (num >= 1 && num <= 5) && typ == protowire.BytesType: // packed varints
			for len(v) > 0 {
				_, n := protowire.ConsumeVarint(v)
				if n < 0 {
					return pbwire.ErrMalformed
				}
				v = v[n:]
			}
		}
		return nil
	})
}

// validParamEntry checks a map<string, InferParameter> entry: its strings must be UTF-8.
func validParamEntry(b []byte) error {
	return pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			return pbwire.UTF8(v)
		case 2:
			return pbwire.Walk(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num == 3 && typ == protowire.BytesType { // string_param
					return pbwire.UTF8(v)
				}
				return nil
			})
		}
		return nil
	})
}

// encodeRepositoryIndexRequest is RepositoryIndexRequest{ready: true}.
func encodeRepositoryIndexRequest() []byte {
	return []byte{0x10, 0x01}
}

// parseRepositoryIndex reads a RepositoryIndexResponse as TritonPool.ready_versions does:
// the versions of each model whose state is "READY" and whose version is a number (ASCII
// digits that fit an int64), sorted ascending.
func parseRepositoryIndex(b []byte) (map[string][]int64, error) {
	ready := make(map[string][]int64)
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if num != 1 || typ != protowire.BytesType {
			return nil
		}
		var name, version, state, reason string
		err := pbwire.Walk(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
			if typ != protowire.BytesType {
				return nil
			}
			switch num {
			case 1:
				return pbwire.String(v, &name)
			case 2:
				return pbwire.String(v, &version)
			case 3:
				return pbwire.String(v, &state)
			case 4:
				return pbwire.String(v, &reason)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if state != "READY" || !digits(version) {
			return nil
		}
		n, err := strconv.ParseInt(version, 10, 64)
		if err != nil {
			return nil // too large to be a version of ours
		}
		ready[name] = append(ready[name], n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, versions := range ready {
		slices.Sort(versions)
	}
	return ready, nil
}

func digits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// encodeFeaturesRequest is GetOnlineFeaturesRequest{entity_ids, feature_refs} (no join_key).
func encodeFeaturesRequest(entityIDs, refs []string) []byte {
	size := 0
	for _, s := range entityIDs {
		size += 1 + protowire.SizeBytes(len(s))
	}
	for _, s := range refs {
		size += 1 + protowire.SizeBytes(len(s))
	}
	b := make([]byte, 0, size)
	for _, s := range entityIDs {
		b = protowire.AppendString(protowire.AppendTag(b, 1, protowire.BytesType), s)
	}
	for _, s := range refs {
		b = protowire.AppendString(protowire.AppendTag(b, 2, protowire.BytesType), s)
	}
	return b
}

// ReadingKind says what a Reading holds.
type ReadingKind uint8

// The kinds of a Reading: no value, a number, a text.
const (
	KindNone ReadingKind = iota
	KindNumber
	KindText
)

// Reading is one feature value as the feature service served it (Python's FeatureReading):
// Number or Text by Kind; Stale when the service said STALE (possibly with no value).
type Reading struct {
	Kind   ReadingKind
	Number float64
	Text   string
	Stale  bool
}

// FeatureStatus values that carry a value.
const (
	statusPresent = 1
	statusStale   = 3
)

// errFeaturesMalformed is a GetOnlineFeaturesResponse that is not one.
var errFeaturesMalformed = fmt.Errorf("feature service answered a malformed GetOnlineFeaturesResponse: %w", pbwire.ErrMalformed)

// parseFeaturesResponse reads a GetOnlineFeaturesResponse as FeatureClient._get does: the
// values line up with the response's feature_refs, or the requested refs when it has none;
// an entity with another number of values is an error (Python's message); only PRESENT and
// STALE values count (_reading). By entity id (a later entity of the same id wins), by ref.
func parseFeaturesResponse(b []byte, refs []string) (map[string]map[string]Reading, error) {
	var names []string
	var entities [][]byte
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			var s string
			if err := pbwire.String(v, &s); err != nil {
				return err
			}
			names = append(names, s)
		case 2:
			entities = append(entities, v)
		}
		return nil
	})
	if err != nil {
		return nil, errFeaturesMalformed
	}
	if len(names) == 0 {
		names = refs
	}
	type entity struct {
		id       string
		readings []Reading
	}
	parsed := make([]entity, len(entities))
	for i, e := range entities {
		p := &parsed[i]
		err := pbwire.Walk(e, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
			if typ != protowire.BytesType {
				return nil
			}
			switch num {
			case 1:
				return pbwire.String(v, &p.id)
			case 2:
				r, err := parseFeatureValue(v)
				p.readings = append(p.readings, r)
				return err
			}
			return nil
		})
		if err != nil {
			return nil, errFeaturesMalformed
		}
	}
	found := make(map[string]map[string]Reading, len(parsed))
	for _, e := range parsed {
		if len(e.readings) != len(names) {
			return nil, fmt.Errorf("feature service answered %d values for %d refs (entity %s)",
				len(e.readings), len(names), oip.PyRepr(e.id))
		}
		m := make(map[string]Reading, len(names))
		for i, name := range names {
			m[name] = e.readings[i]
		}
		found[e.id] = m
	}
	return found, nil
}

// parseFeatureValue reads a loopmesh.v1.FeatureValue into a Reading as _reading does. Its
// value (a Value, merged over repeated records: the last oneof member set wins) counts only
// when the status is PRESENT or STALE.
func parseFeatureValue(b []byte) (Reading, error) {
	var val Reading // Kind and Number/Text of the value
	var status int32
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			return pbwire.Walk(v, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
				switch {
				case num == 1 && typ == protowire.Fixed64Type:
					val = Reading{Kind: KindNumber, Number: math.Float64frombits(x)}
				case num == 2 && typ == protowire.BytesType:
					var s string
					if err := pbwire.String(v, &s); err != nil {
						return err
					}
					val = Reading{Kind: KindText, Text: s}
				}
				return nil
			})
		case num == 2 && typ == protowire.VarintType:
			status = int32(x)
		case num == 3 && typ == protowire.BytesType: // event_time: checked, not used
			return pbwire.Walk(v, func(protowire.Number, protowire.Type, []byte, uint64) error { return nil })
		}
		return nil
	})
	if err != nil || (status != statusPresent && status != statusStale) {
		return Reading{}, err
	}
	val.Stale = status == statusStale
	return val, nil
}

// isMalformed says whether err comes from bytes that are not the expected message.
func isMalformed(err error) bool { return errors.Is(err, pbwire.ErrMalformed) }
