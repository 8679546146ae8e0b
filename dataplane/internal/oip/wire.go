package oip

import (
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
)

var ErrMalformed = pbwire.ErrMalformed

// Typed content fields of InferTensorContents, by field number.
const (
	BoolContents   = 1
	IntContents    = 2
	Int64Contents  = 3
	UintContents   = 4
	Uint64Contents = 5
	FP32Contents   = 6
	FP64Contents   = 7
	BytesContents  = 8
)

// InferRequest holds what the data plane reads of a ModelInferRequest.
type InferRequest struct {
	ModelName    string
	ModelVersion string
	ID           string
	// RoutingKey is parameters["routing_key"].string_param when that entry holds a string.
	RoutingKey    string
	HasRoutingKey bool
	Inputs        []Tensor
	Raw           [][]byte // raw_input_contents, aliasing the request bytes
}

// Tensor holds what the checks read of an InferInputTensor.
type Tensor struct {
	Name         string
	Datatype     string
	Shape        []int64
	SharedMemory bool   // parameters has "shared_memory_region"
	Counts       [9]int // element count of each typed contents field, by field number
}

// ParseInferRequest reads a serialized ModelInferRequest. Repeated singular fields keep the
// last value and repeated messages merge, as protobuf parsers do.
func ParseInferRequest(b []byte) (*InferRequest, error) {
	r := &InferRequest{}
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			return pbwire.String(v, &r.ModelName)
		case 2:
			return pbwire.String(v, &r.ModelVersion)
		case 3:
			return pbwire.String(v, &r.ID)
		case 4:
			key, p, err := parseParamEntry(v)
			if err == nil && key == "routing_key" {
				r.HasRoutingKey, r.RoutingKey = p.kind == 3, p.str
			}
			return err
		case 5:
			t, err := parseTensor(v)
			r.Inputs = append(r.Inputs, t)
			return err
		case 6:
			return pbwire.Walk(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if typ != protowire.BytesType {
					return nil
				}
				switch num {
				case 1:
					return pbwire.UTF8(v)
				case 2:
					_, _, err := parseParamEntry(v)
					return err
				}
				return nil
			})
		case 7:
			r.Raw = append(r.Raw, v)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

func parseTensor(b []byte) (Tensor, error) {
	var t Tensor
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		switch {
		case num == 3 && typ == protowire.VarintType:
			t.Shape = append(t.Shape, int64(x))
		case num == 3 && typ == protowire.BytesType: // packed shape
			if t.Shape == nil {
				t.Shape = make([]int64, 0, varints(v))
			}
			for len(v) > 0 {
				d, n := protowire.ConsumeVarint(v)
				if n < 0 {
					return ErrMalformed
				}
				t.Shape = append(t.Shape, int64(d))
				v = v[n:]
			}
		case typ != protowire.BytesType:
		case num == 1:
			return pbwire.String(v, &t.Name)
		case num == 2:
			if dt, ok := datatypes[string(v)]; ok { // the usual names, without a copy
				t.Datatype = dt
				return nil
			}
			return pbwire.String(v, &t.Datatype)
		case num == 4:
			key, _, err := parseParamEntry(v)
			if key == "shared_memory_region" {
				t.SharedMemory = true
			}
			return err
		case num == 5:
			return countContents(v, &t.Counts)
		}
		return nil
	})
	return t, err
}

// datatypes interns the datatype names the checks know.
var datatypes = func() map[string]string {
	m := map[string]string{"BYTES": "BYTES"}
	for dt := range ElementBytes {
		m[dt] = dt
	}
	return m
}()

// varints counts the varints of a packed field (the bytes without a continuation bit).
func varints(v []byte) int {
	n := 0
	for _, c := range v {
		if c < 0x80 {
			n++
		}
	}
	return n
}

// countContents adds the element count of each typed field of an InferTensorContents,
// packed (one length-delimited record) or not (one record per element).
func countContents(b []byte, counts *[9]int) error {
	return pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		var elem protowire.Type
		switch num {
		case BoolContents, IntContents, Int64Contents, UintContents, Uint64Contents:
			elem = protowire.VarintType
		case FP32Contents:
			elem = protowire.Fixed32Type
		case FP64Contents:
			elem = protowire.Fixed64Type
		case BytesContents:
			if typ == protowire.BytesType {
				counts[num]++
			}
			return nil
		default:
			return nil
		}
		switch typ {
		case elem:
			counts[num]++
		case protowire.BytesType:
			switch elem {
			case protowire.Fixed32Type, protowire.Fixed64Type:
				size := 4
				if elem == protowire.Fixed64Type {
					size = 8
				}
				if len(v)%size != 0 {
					return ErrMalformed
				}
				counts[num] += len(v) / size
			default:
				for len(v) > 0 {
					_, n := protowire.ConsumeVarint(v)
					if n < 0 {
						return ErrMalformed
					}
					counts[num]++
					v = v[n:]
				}
			}
		}
		return nil
	})
}

// param is the set member of an InferParameter oneof (kind = its field number, 0 if none).
type param struct {
	kind protowire.Number
	str  string
}

// parseParamEntry reads one map<string, InferParameter> entry (key=1, value=2).
func parseParamEntry(b []byte) (string, param, error) {
	var key string
	var p param
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			return pbwire.String(v, &key)
		case 2: // a repeated message field merges: the oneof member set last wins
			return pbwire.Walk(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				switch {
				case (num == 1 || num == 2 || num == 5) && typ == protowire.VarintType,
					num == 4 && typ == protowire.Fixed64Type:
					p = param{kind: num}
				case num == 3 && typ == protowire.BytesType:
					p = param{kind: num}
					return pbwire.String(v, &p.str)
				}
				return nil
			})
		}
		return nil
	})
	return key, p, err
}

// ParseModelRequest reads ModelReady/ModelMetadata/ModelConfig requests: name=1, version=2.
func ParseModelRequest(b []byte) (name, version string, err error) {
	err = pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case 1:
			return pbwire.String(v, &name)
		case 2:
			return pbwire.String(v, &version)
		}
		return nil
	})
	return name, version, err
}

// Validate checks that b is well-formed protobuf (for messages with no fields we read).
func Validate(b []byte) error {
	return pbwire.Walk(b, func(protowire.Number, protowire.Type, []byte, uint64) error { return nil })
}

// ReadBool returns the last value of bool field num (false when absent).
func ReadBool(b []byte, num protowire.Number) (bool, error) {
	var out bool
	err := pbwire.Walk(b, func(n protowire.Number, typ protowire.Type, _ []byte, x uint64) error {
		if n == num && typ == protowire.VarintType {
			out = x != 0
		}
		return nil
	})
	return out, err
}

// StringField encodes field num holding s. Appended to a message, it replaces a singular
// string field's value (the last one wins) without touching the rest.
func StringField(num protowire.Number, s string) []byte {
	return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
}
