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
		var raw []byte
		if len(r.Raw) > 0 {
			raw = r.Raw[i]
		}
		if msg := checkTensor(&r.Inputs[i], raw, len(r.Raw) > 0, i); msg != "" {
			return msg
		}
	}
	return ""
}

// checkTensor checks input i; its name goes into a message only when there is one (an
// accepted request builds no string).
func checkTensor(t *Tensor, raw []byte, hasRaw bool, i int) string {
	msg := tensorProblem(t, raw, hasRaw)
	if msg == "" {
		return ""
	}
	name := t.Name
	if name == "" {
		name = "unnamed"
	}
	return fmt.Sprintf("inputs[%d] (%s): %s", i, name, msg)
}

// tensorProblem is what is wrong with a tensor's data, or "".
func tensorProblem(t *Tensor, raw []byte, hasRaw bool) string {
	if t.SharedMemory {
		return "shared memory is not served through the gateway"
	}
	dt := t.Datatype
	size, fixed := ElementBytes[dt]
	if dt != "BYTES" && !fixed {
		return fmt.Sprintf("unknown datatype %s", PyRepr(dt))
	}
	elements := num{v: 1}
	for _, d := range t.Shape {
		if d < 0 {
			return fmt.Sprintf("shape %s has a negative dimension", PyList(t.Shape))
		}
		elements = elements.mul(uint64(d))
	}
	if hasRaw {
		for _, c := range contentsNames {
			if t.Counts[c.field] > 0 {
				return "contents given together with raw_input_contents"
			}
		}
		if fixed {
			if needed := elements.mul(size); !needed.eq(len(raw)) {
				return fmt.Sprintf("%s shape %s needs %s bytes, raw_input_contents has %d",
					dt, PyList(t.Shape), needed, len(raw))
			}
			return ""
		}
		return checkRawBytes(elements, raw, t.Shape)
	}
	expected := typedField[dt]
	for _, c := range contentsNames {
		if t.Counts[c.field] > 0 && c.field != expected {
			return fmt.Sprintf("contents.%s cannot hold %s", c.name, dt)
		}
	}
	given := 0
	if expected != 0 {
		given = t.Counts[expected]
	}
	if !elements.eq(given) {
		return fmt.Sprintf("%s shape %s declares %s elements, contents hold %d",
			dt, PyList(t.Shape), elements, given)
	}
	return ""
}

// checkRawBytes walks BYTES raw contents: (4-byte little-endian length, bytes) elements.
func checkRawBytes(elements num, raw []byte, shape []int64) string {
	offset, count := 0, 0
	for offset < len(raw) {
		if offset+4 > len(raw) {
			return fmt.Sprintf("BYTES element %d has a truncated length prefix", count)
		}
		length := uint64(binary.LittleEndian.Uint32(raw[offset:]))
		if uint64(len(raw)-offset-4) < length {
			return fmt.Sprintf("BYTES element %d is longer than the data left", count)
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
		return fmt.Sprintf("BYTES shape %s declares %s elements, raw_input_contents holds %s",
			PyList(shape), elements, held)
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
