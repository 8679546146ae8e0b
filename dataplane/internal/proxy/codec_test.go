package proxy

import (
	"testing"

	"google.golang.org/grpc/mem"
)

func TestCodecPassesBytesThrough(t *testing.T) {
	var c Codec
	out, err := c.Marshal(Parts{[]byte("ab"), nil, []byte("c")})
	if err != nil || string(out.Materialize()) != "abc" || len(out) != 2 {
		t.Fatalf("%v %v", out, err)
	}
	if out, _ := c.Marshal([]byte(nil)); out.Len() != 0 {
		t.Fatal("empty message")
	}
	var got []byte
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer("xy"), mem.SliceBuffer("z")}, &got); err != nil || string(got) != "xyz" {
		t.Fatalf("%q %v", got, err)
	}
	if _, err := c.Marshal(42); err == nil {
		t.Fatal("marshalled an int")
	}
	if err := c.Unmarshal(nil, new(string)); err == nil {
		t.Fatal("unmarshalled into a string")
	}
	if s, m := split("/pkg.Svc/Method"); s != "pkg.Svc" || m != "Method" {
		t.Fatal(s, m)
	}
}
