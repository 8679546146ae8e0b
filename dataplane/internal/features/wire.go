package features

import (
	"encoding/binary"
	"math"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/loopmesh/loopmesh/dataplane/internal/pbwire"
)

var errMalformed = pbwire.ErrMalformed

// request is a GetOnlineFeaturesRequest.
type request struct {
	entityIDs   []string
	featureRefs []string
	joinKey     string
}

// parseRequest reads loopmesh.v1.GetOnlineFeaturesRequest as protobuf does: repeated fields
// accumulate, the last join_key wins, a field of an unexpected wire type is an unknown field.
func parseRequest(b []byte) (*request, error) {
	r := &request{}
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ != protowire.BytesType || num < 1 || num > 3 {
			return nil
		}
		if !utf8.Valid(v) {
			return errMalformed
		}
		switch num {
		case 1:
			r.entityIDs = append(r.entityIDs, string(v))
		case 2:
			r.featureRefs = append(r.featureRefs, string(v))
		case 3:
			r.joinKey = string(v)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// kind of a stored value, as loopmesh.features.store._python_value sees it.
type kind uint8

const (
	null   kind = iota // no value: MISSING
	number             // int64, int32, double, float or bool
	text               // string
)

// value is one stored feature value.
type value struct {
	kind kind
	num  float64
	text string
}

// Wire types of feast.types.Value's "val" oneof members; every member not listed is
// length-delimited (bytes, strings and messages).
var valueWireTypes = map[protowire.Number]protowire.Type{
	3: protowire.VarintType, 4: protowire.VarintType, 5: protowire.Fixed64Type,
	6: protowire.Fixed32Type, 7: protowire.VarintType, 8: protowire.VarintType,
	19: protowire.VarintType,
}

func isValueMember(num protowire.Number) bool {
	return (num >= 1 && num <= 8) || (num >= 11 && num <= 29) || (num >= 32 && num <= 48)
}

// parseValue reads a serialized feast.types.Value (the last oneof member set wins) and
// returns it as the Python FeatureService serves it: int64, int32, double, float and bool
// (as 0/1) are numbers, string is text, anything else (null, lists, bytes...) is no value.
func parseValue(b []byte) (value, error) {
	var out value
	err := pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error {
		if !isValueMember(num) {
			return nil
		}
		want, ok := valueWireTypes[num]
		if !ok {
			want = protowire.BytesType
		}
		if typ != want {
			return nil // an unknown field to protobuf
		}
		switch num {
		case 2: // string_val
			if !utf8.Valid(v) {
				return errMalformed
			}
			out = value{kind: text, text: string(v)}
		case 3: // int32_val
			out = value{kind: number, num: float64(int32(x))}
		case 4: // int64_val
			out = value{kind: number, num: float64(int64(x))}
		case 5: // double_val
			out = value{kind: number, num: math.Float64frombits(x)}
		case 6: // float_val
			out = value{kind: number, num: float64(math.Float32frombits(uint32(x)))}
		case 7: // bool_val
			out = value{kind: number}
			if x != 0 {
				out.num = 1
			}
		default:
			out = value{}
		}
		return nil
	})
	return out, err
}

// parseTimestamp reads a google.protobuf.Timestamp.
func parseTimestamp(b []byte) (seconds int64, nanos int32, err error) {
	err = pbwire.Walk(b, func(num protowire.Number, typ protowire.Type, _ []byte, x uint64) error {
		if typ != protowire.VarintType {
			return nil
		}
		switch num {
		case 1:
			seconds = int64(x)
		case 2:
			nanos = int32(x)
		}
		return nil
	})
	return seconds, nanos, err
}

// Feast's ValueType.STRING.
const valueTypeString = 2

// entityKey is feast.infra.key_encoding_utils.serialize_entity_key (version 3) of a
// one-key EntityKey with a string value.
func entityKey(joinKey, id string) []byte {
	out := make([]byte, 0, 20+len(joinKey)+len(id))
	out = binary.LittleEndian.AppendUint32(out, 1)
	out = binary.LittleEndian.AppendUint32(out, valueTypeString)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(joinKey)))
	out = append(out, joinKey...)
	out = binary.LittleEndian.AppendUint32(out, valueTypeString)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(id)))
	return append(out, id...)
}

// mmh3 is MurmurHash3 x86 32-bit with seed 0 (Python's mmh3.hash(key, signed=False)).
func mmh3(key []byte) uint32 {
	const c1, c2 = 0xcc9e2d51, 0x1b873593
	var h uint32
	n := len(key)
	for len(key) >= 4 {
		k := binary.LittleEndian.Uint32(key)
		key = key[4:]
		k *= c1
		k = k<<15 | k>>17
		k *= c2
		h ^= k
		h = h<<13 | h>>19
		h = h*5 + 0xe6546b64
	}
	var k uint32
	switch len(key) {
	case 3:
		k ^= uint32(key[2]) << 16
		fallthrough
	case 2:
		k ^= uint32(key[1]) << 8
		fallthrough
	case 1:
		k ^= uint32(key[0])
		k *= c1
		k = k<<15 | k>>17
		k *= c2
		h ^= k
	}
	h ^= uint32(n)
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// redisField is feast helpers._mmh3("<view>:<feature>"): the hash's little-endian bytes.
func redisField(view, feature string) string {
	return string(binary.LittleEndian.AppendUint32(nil, mmh3([]byte(view+":"+feature))))
}

// Statuses of loopmesh.v1.FeatureStatus.
const (
	statusPresent = 1
	statusMissing = 2
	statusStale   = 3
)

// cell is one served value: what the store holds and its status.
type cell struct {
	v       value
	seconds int64 // event time, whole seconds; 0: none
	status  uint64
}

func sizeCell(c *cell) int {
	n := protowire.SizeTag(2) + protowire.SizeVarint(c.status)
	if c.v.kind != null {
		vs := valueSize(c)
		n += protowire.SizeTag(1) + protowire.SizeBytes(vs)
	}
	if c.seconds != 0 {
		ts := protowire.SizeTag(1) + protowire.SizeVarint(uint64(c.seconds))
		n += protowire.SizeTag(3) + protowire.SizeBytes(ts)
	}
	return n
}

func valueSize(c *cell) int {
	if c.v.kind == text {
		return protowire.SizeTag(2) + protowire.SizeBytes(len(c.v.text))
	}
	return protowire.SizeTag(1) + protowire.SizeFixed64()
}

// appendCell writes a loopmesh.v1.FeatureValue, fields in number order like protobuf.
func appendCell(b []byte, c *cell) []byte {
	if c.v.kind != null {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(valueSize(c)))
		if c.v.kind == text {
			b = protowire.AppendTag(b, 2, protowire.BytesType)
			b = protowire.AppendString(b, c.v.text)
		} else {
			b = protowire.AppendTag(b, 1, protowire.Fixed64Type)
			b = protowire.AppendFixed64(b, math.Float64bits(c.v.num))
		}
	}
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, c.status)
	if c.seconds != 0 {
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(protowire.SizeTag(1)+protowire.SizeVarint(uint64(c.seconds))))
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(c.seconds))
	}
	return b
}

// appendResponse writes a GetOnlineFeaturesResponse: refs, then per entity its id and one
// value per ref (cells[e*len(refs)+f]).
func appendResponse(b []byte, refs, ids []string, cells []cell) []byte {
	for _, ref := range refs {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, ref)
	}
	per := len(refs)
	for e, id := range ids {
		row := cells[e*per : (e+1)*per]
		size := 0
		if id != "" {
			size += protowire.SizeTag(1) + protowire.SizeBytes(len(id))
		}
		for i := range row {
			size += protowire.SizeTag(2) + protowire.SizeBytes(sizeCell(&row[i]))
		}
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(size))
		if id != "" {
			b = protowire.AppendTag(b, 1, protowire.BytesType)
			b = protowire.AppendString(b, id)
		}
		for i := range row {
			b = protowire.AppendTag(b, 2, protowire.BytesType)
			b = protowire.AppendVarint(b, uint64(sizeCell(&row[i])))
			b = appendCell(b, &row[i])
		}
	}
	return b
}
