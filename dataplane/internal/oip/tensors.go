package oip

import (
	"encoding/binary"
	"fmt"
	"math/big"
	"math/bits"
)

// ElementBytes is the size of each fixed-size datatype's element.
var ElementBytes = map[string]uint64{
	"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
	"INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
	"FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8,
}

// typedField is the InferTensorContents field holding each datatype's values (FP16 and BF16
// have none: they travel only as raw bytes).
var typedField = map[string]int{
	"BOOL": BoolContents, "UINT8": UintContents, "UINT16": UintContents, "UINT32": UintContents,
	"UINT64": Uint64Contents, "INT8": IntContents, "INT16": IntContents, "INT32": IntContents,
	"INT64": Int64Contents, "FP32": FP32Contents, "FP64": FP64Contents, "BYTES": BytesContents,
}

// contentsNames in alphabetical order (the order Python reports the first wrong field in).
var contentsNames = []struct {
	name  string
	field int
}{
	{"bool_contents", BoolContents}, {"bytes_contents", BytesContents},
	{"fp32_contents", FP32Contents}, {"fp64_contents", FP64Contents},
	{"int64_contents", Int64Contents}, {"int_contents", IntContents},
	{"uint64_contents", Uint64Contents}, {"uint_contents", UintContents},
}

// CheckInputs returns "" when every input's data matches its shape and datatype, else the
// message Python's loopmesh.inference.tensors.check_infer_inputs raises.
func CheckInputs(r *InferRequest) string {
	if len(r.Raw) > 0 && len(r.Raw) != len(r.Inputs) {
		return fmt.Sprintf("raw_input_contents: %d entries for %d inputs "+
			"(raw contents must be given for every input or for none)", len(r.Raw), len(r.Inputs))
	}
	for i := range r.Inputs {
		t := &r.Inputs[i]
		name := t.Name
		if name == "" {
			name = "unnamed"
		}
		where := fmt.Sprintf("inputs[%d] (%s)", i, name)
		var raw []byte
		if len(r.Raw) > 0 {
			raw = r.Raw[i]
		}
		if msg := checkTensor(t, raw, len(r.Raw) > 0, where); msg != "" {
			return msg
		}
	}
	return ""
}

func checkTensor(t *Tensor, raw []byte, hasRaw bool, where string) string {
	if t.SharedMemory {
		return where + ": shared memory is not served through the gateway"
	}
	dt := t.Datatype
	size, fixed := ElementBytes[dt]
	if dt != "BYTES" && !fixed {
		return fmt.Sprintf("%s: unknown datatype %s", where, PyRepr(dt))
	}
	elements := num{v: 1}
	for _, d := range t.Shape {
		if d < 0 {
			return fmt.Sprintf("%s: shape %s has a negative dimension", where, PyList(t.Shape))
		}
		elements = elements.mul(uint64(d))
	}
	if hasRaw {
		for _, c := range contentsNames {
			if t.Counts[c.field] > 0 {
				return where + ": contents given together with raw_input_contents"
			}
		}
		if fixed {
			if needed := elements.mul(size); !needed.eq(len(raw)) {
				return fmt.Sprintf("%s: %s shape %s needs %s bytes, raw_input_contents has %d",
					where, dt, PyList(t.Shape), needed, len(raw))
			}
			return ""
		}
		return checkRawBytes(elements, raw, t.Shape, where)
	}
	expected := typedField[dt]
	for _, c := range contentsNames {
		if t.Counts[c.field] > 0 && c.field != expected {
			return fmt.Sprintf("%s: contents.%s cannot hold %s", where, c.name, dt)
		}
	}
	given := 0
	if expected != 0 {
		given = t.Counts[expected]
	}
	if !elements.eq(given) {
		return fmt.Sprintf("%s: %s shape %s declares %s elements, contents hold %d",
			where, dt, PyList(t.Shape), elements, given)
	}
	return ""
}

// checkRawBytes walks BYTES raw contents: (4-byte little-endian length, bytes) elements.
func checkRawBytes(elements num, raw []byte, shape []int64, where string) string {
	offset, count := 0, 0
	for offset < len(raw) {
		if offset+4 > len(raw) {
			return fmt.Sprintf("%s: BYTES element %d has a truncated length prefix", where, count)
		}
		length := uint64(binary.LittleEndian.Uint32(raw[offset:]))
		if uint64(len(raw)-offset-4) < length {
			return fmt.Sprintf("%s: BYTES element %d is longer than the data left", where, count)
		}
		offset += 4 + int(length)
		count++
		if elements.less(count) {
			break
		}
	}
	if !elements.eq(count) {
		held := fmt.Sprint(count)
		if elements.less(count) {
			held = "more"
		}
		return fmt.Sprintf("%s: BYTES shape %s declares %s elements, raw_input_contents holds %s",
			where, PyList(shape), elements, held)
	}
	return ""
}

// num is a non-negative integer that falls back to big.Int past uint64, as Python's ints do
// (a hostile shape's product must be reported exactly, not wrapped).
type num struct {
	v   uint64
	big *big.Int
}

func (n num) mul(k uint64) num {
	if n.big == nil {
		if hi, lo := bits.Mul64(n.v, k); hi == 0 {
			return num{v: lo}
		}
		n.big = new(big.Int).SetUint64(n.v)
	}
	b := new(big.Int).Mul(n.big, new(big.Int).SetUint64(k))
	if b.IsUint64() {
		return num{v: b.Uint64()}
	}
	return num{big: b}
}

func (n num) eq(k int) bool   { return n.big == nil && k >= 0 && n.v == uint64(k) }
func (n num) less(k int) bool { return n.big == nil && k >= 0 && n.v < uint64(k) }

func (n num) String() string {
	if n.big != nil {
		return n.big.String()
	}
	return fmt.Sprint(n.v)
}

// CheckInfer parses a ModelInferRequest and runs the gateway's checks in order (decoding,
// model_name, model_version, tensors). It returns the request, or the INVALID_ARGUMENT
// message that refuses it.
func CheckInfer(b []byte) (*InferRequest, string) {
	r, err := ParseInferRequest(b)
	switch {
	case err != nil:
		return nil, "request: not ModelInferRequest"
	case r.ModelName == "":
		return r, "model_name: required"
	case !ValidName(r.ModelName):
		return r, "model_name: " + InvalidName(r.ModelName)
	case r.ModelVersion != "" && !ValidVersion(r.ModelVersion):
		return r, "model_version: " + InvalidVersion(r.ModelVersion)
	}
	return r, CheckInputs(r)
}
