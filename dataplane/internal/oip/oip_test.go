package oip

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"strconv"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

// testdata/python_cases.json holds verdicts computed by the Python implementation
// (tritonclient's ModelInferRequest parser, model_repo's validators, tensors.check_infer_inputs).
type pythonCases struct {
	Cases []struct {
		Label, Hex, Want string
	}
	Names []struct{ Name, Want string }
}

func loadCases(t *testing.T) pythonCases {
	t.Helper()
	raw, err := os.ReadFile("testdata/python_cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var c pythonCases
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCheckInferMatchesPython(t *testing.T) {
	c := loadCases(t)
	if len(c.Cases) < 100 {
		t.Fatalf("only %d cases", len(c.Cases))
	}
	for _, tc := range c.Cases {
		b, err := hex.DecodeString(tc.Hex)
		if err != nil {
			t.Fatal(err)
		}
		r, msg := CheckInfer(b)
		got := msg
		if msg == "" {
			key := "<none>"
			switch {
			case r.HasRoutingKey:
				key = PyRepr(r.RoutingKey)
			case r.ID != "":
				key = PyRepr(r.ID)
			}
			got = "OK key=" + key
		}
		if got != tc.Want {
			t.Errorf("%s:\n got %q\nwant %q", tc.Label, got, tc.Want)
		}
	}
}

func TestNamesMatchPython(t *testing.T) {
	for _, tc := range loadCases(t).Names {
		got := ""
		if !ValidName(tc.Name) {
			got = InvalidName(tc.Name)
		}
		if got != tc.Want {
			t.Errorf("%q: got %q want %q", tc.Name, got, tc.Want)
		}
	}
}

func TestValidVersion(t *testing.T) {
	for v, ok := range map[string]bool{"1": true, "10": true, "999999999999999999": true,
		"0": false, "": false, "01": false, "1000000000000000000": false, "+1": false, "1 ": false} {
		if ValidVersion(v) != ok {
			t.Errorf("%q: want %v", v, ok)
		}
	}
}

func TestStringFieldOverridesVersion(t *testing.T) {
	req := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "m")
	req = protowire.AppendString(protowire.AppendTag(req, 2, protowire.BytesType), "1")
	suffix := StringField(2, strconv.Itoa(123456789012345678))
	if !bytes.Equal(suffix[:2], []byte{0x12, 18}) {
		t.Fatalf("suffix %x", suffix)
	}
	r, err := ParseInferRequest(append(append([]byte{}, req...), suffix...))
	if err != nil || r.ModelVersion != "123456789012345678" || r.ModelName != "m" {
		t.Fatalf("got %+v, %v", r, err)
	}
}

func TestReadBoolAndModelRequest(t *testing.T) {
	if ok, err := ReadBool([]byte{0x08, 0x01, 0x08, 0x00}, 1); ok || err != nil {
		t.Fatalf("last value wins: %v %v", ok, err)
	}
	if ok, _ := ReadBool([]byte{0x08, 0x01}, 1); !ok {
		t.Fatal("ready")
	}
	if _, err := ReadBool([]byte{0x08}, 1); err == nil {
		t.Fatal("truncated varint accepted")
	}
	msg := append(StringField(1, "m"), StringField(2, "3")...)
	if name, version, err := ParseModelRequest(msg); name != "m" || version != "3" || err != nil {
		t.Fatalf("%q %q %v", name, version, err)
	}
	if _, _, err := ParseModelRequest([]byte{0x0a, 0x01, 0xff}); err == nil {
		t.Fatal("invalid UTF-8 accepted")
	}
	if Validate([]byte{0xff}) == nil || Validate(nil) != nil {
		t.Fatal("Validate")
	}
}

func TestShownCutsLikePython(t *testing.T) {
	long := bytes.Repeat([]byte("x"), 100)
	want := "'" + string(long[:79]) + "... (102 characters)"
	if got := Shown(string(long)); got != want {
		t.Fatalf("got %q", got)
	}
	if PyList(nil) != "[]" || PyList([]int64{1, -2}) != "[1, -2]" {
		t.Fatal("PyList")
	}
}
