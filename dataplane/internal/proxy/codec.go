// Package proxy passes gRPC messages through as raw bytes: a codec that never decodes, and a
// transparent stream proxy for every service the data plane does not serve itself.
package proxy

import (
	"fmt"

	"google.golang.org/grpc/mem"
)

// Parts is a message sent as the concatenation of its parts, without copying them (a request
// and the field appended to re-target it).
type Parts [][]byte

// Codec marshals []byte, *[]byte and Parts as they are and unmarshals into *[]byte. It is
// installed per server and per connection (never registered globally: the OTLP exporter in
// the same process needs the real proto codec).
type Codec struct{}

// Name is "proto": on the wire these are protobuf messages.
func (Codec) Name() string { return "proto" }

// Marshal hands the bytes to gRPC as they are.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case []byte:
		return one(m), nil
	case *[]byte:
		return one(*m), nil
	case Parts:
		out := make(mem.BufferSlice, 0, len(m))
		for _, p := range m {
			if len(p) > 0 {
				out = append(out, mem.SliceBuffer(p))
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("raw codec: cannot marshal %T", v)
}

func one(b []byte) mem.BufferSlice {
	if len(b) == 0 {
		return nil
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}
}

// Unmarshal copies the received frame once into a fresh slice (gRPC reuses its buffers).
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: cannot unmarshal into %T", v)
	}
	*p = data.Materialize()
	return nil
}
