// Package pbwire walks raw protobuf bytes field by field: the data plane reads only the
// fields it needs from requests it otherwise passes on as they are.
package pbwire

import (
	"errors"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// ErrMalformed: bytes that are not the expected message (protobuf's parsers refuse them too:
// a truncated field, field number 0, a string that is not UTF-8).
var ErrMalformed = errors.New("malformed protobuf")

// Walk calls fn for each field of b: v is the payload of a length-delimited field and x the
// value of a varint or fixed field. Groups are skipped (still checked).
func Walk(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		var v []byte
		var x uint64
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		case protowire.Fixed32Type:
			var x32 uint32
			x32, n = protowire.ConsumeFixed32(b)
			x = uint64(x32)
		case protowire.Fixed64Type:
			x, n = protowire.ConsumeFixed64(b)
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if err := fn(num, typ, v, x); err != nil {
			return err
		}
	}
	return nil
}

// String sets *dst to the string field v; ErrMalformed when v is not UTF-8 (as protobuf).
func String(v []byte, dst *string) error {
	if err := UTF8(v); err != nil {
		return err
	}
	*dst = string(v)
	return nil
}

// UTF8 is ErrMalformed when v, a string field, is not UTF-8.
func UTF8(v []byte) error {
	if !utf8.Valid(v) {
		return ErrMalformed
	}
	return nil
}
