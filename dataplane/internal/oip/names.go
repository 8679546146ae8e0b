// Package oip reads and rewrites Open Inference Protocol (KServe V2 / Triton) messages with
// protowire, without generated code: only the fields the data plane needs are read, and
// requests are re-targeted by appending a field, so tensors are never re-encoded.
package oip

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ModelNamePattern is the repository's model name rule (loopmesh.mesh.model_repo).
const ModelNamePattern = "[A-Za-z][A-Za-z0-9_-]{0,63}"

// ValidName reports whether name fully matches ModelNamePattern.
func ValidName(name string) bool {
	if len(name) == 0 || len(name) > 64 || !isLetter(name[0]) {
		return false
	}
	for i := 1; i < len(name); i++ {
		c := name[i]
		if !isLetter(c) && !(c >= '0' && c <= '9') && c != '_' && c != '-' {
			return false
		}
	}
	return true
}

// ValidVersion reports whether v fully matches [1-9][0-9]{0,17} (a positive int64).
func ValidVersion(v string) bool {
	if len(v) == 0 || len(v) > 18 || v[0] < '1' || v[0] > '9' {
		return false
	}
	for i := 1; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return false
		}
	}
	return true
}

func isLetter(c byte) bool { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') }

// InvalidName is Python's "invalid model name ..." message for name.
func InvalidName(name string) string {
	return "invalid model name " + Shown(name) + ": expected " + ModelNamePattern
}

// InvalidVersion is Python's "invalid model version ..." message for v.
func InvalidVersion(v string) string {
	return "invalid model version " + Shown(v) + ": expected a positive integer"
}

// Shown is Python's repr(s) cut to 80 characters (an over-long status never reaches the client).
func Shown(s string) string {
	text := PyRepr(s)
	n := utf8.RuneCountInString(text)
	if n <= 80 {
		return text
	}
	cut, i := 0, 0
	for i = range text {
		if cut == 80 {
			break
		}
		cut++
	}
	return fmt.Sprintf("%s... (%d characters)", text[:i], n)
}

// PyRepr renders s as CPython's repr(str) does (s is valid UTF-8: protobuf strings are checked).
func PyRepr(s string) string {
	quote := byte('\'')
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		quote = '"'
	}
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte(quote)
	for _, r := range s {
		switch {
		case r == rune(quote) || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < ' ' || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r < 0x7f:
			b.WriteRune(r)
		case unicode.IsPrint(r): // Python's isprintable: not C*, not Z* but the space
			b.WriteRune(r)
		case r <= 0xff:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r <= 0xffff:
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			fmt.Fprintf(&b, `\U%08x`, r)
		}
	}
	b.WriteByte(quote)
	return b.String()
}

// PyList renders dims as Python's str(list) does: "[1, 8]", "[]".
func PyList(dims []int64) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, d := range dims {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprint(&b, d)
	}
	b.WriteByte(']')
	return b.String()
}
