package oip

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

// benchRequest is bench/inference_bench.py's request: model "bench", id "bench", one FP32
// [1, 10] input as raw contents.
func benchRequest() []byte {
	b := StringField(1, "bench")
	b = append(b, StringField(3, "bench")...)
	tensor := append(StringField(1, "INPUT__0"), StringField(2, "FP32")...)
	tensor = protowire.AppendBytes(protowire.AppendTag(tensor, 3, protowire.BytesType), []byte{1, 10})
	b = protowire.AppendBytes(protowire.AppendTag(b, 5, protowire.BytesType), tensor)
	return protowire.AppendBytes(protowire.AppendTag(b, 7, protowire.BytesType), make([]byte, 40))
}

func BenchmarkCheckInfer(b *testing.B) {
	req := benchRequest()
	b.ReportAllocs()
	for b.Loop() {
		if r, msg := CheckInfer(req); r == nil || msg != "" {
			b.Fatal(msg)
		}
	}
}
