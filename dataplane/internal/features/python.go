package features

//go:generate ../../../.venv/bin/python pytables.py

import (
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// The Python FeatureService's error messages quote what the client sent with repr() (cut by
// loopmesh.mesh.model_repo.shown) and check entity ids with str.strip() and len(): the same
// rules here, from Python's own character tables (pytables.go), so both answer alike.

func pyIsSpace(r rune) bool { return pySpaces[r] }

func pyPrintable(r rune) bool {
	if r < 0x80 {
		return r >= 0x20 && r < 0x7f
	}
	i := sort.Search(len(pyUnprintable), func(i int) bool { return pyUnprintable[i][1] >= r })
	return i == len(pyUnprintable) || r < pyUnprintable[i][0]
}

// pyStrip is str.strip().
func pyStrip(s string) string { return strings.TrimFunc(s, pyIsSpace) }

// pyLen is len() of a str: code points.
func pyLen(s string) int { return utf8.RuneCountInString(s) }

// pyRepr is repr() of a str.
func pyRepr(s string) string {
	quote := byte('\'')
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		quote = '"'
	}
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte(quote)
	const hex = "0123456789abcdef"
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
		case pyPrintable(r):
			b.WriteRune(r)
		case r <= 0xff:
			b.WriteString(`\x`)
			b.WriteByte(hex[r>>4])
			b.WriteByte(hex[r&0xf])
		case r <= 0xffff:
			b.WriteString(`\u`)
			for shift := 12; shift >= 0; shift -= 4 {
				b.WriteByte(hex[(r>>shift)&0xf])
			}
		default:
			b.WriteString(`\U`)
			for shift := 28; shift >= 0; shift -= 4 {
				b.WriteByte(hex[(r>>shift)&0xf])
			}
		}
	}
	b.WriteByte(quote)
	return b.String()
}

// shown is loopmesh.mesh.model_repo.shown of a str: its repr, cut to 80 characters.
func shown(s string) string {
	const limit = 80
	text := pyRepr(s)
	n := pyLen(text)
	if n <= limit {
		return text
	}
	cut, i := text, 0
	for j := range text {
		if i == limit {
			cut = text[:j]
			break
		}
		i++
	}
	return cut + "... (" + strconv.Itoa(n) + " characters)"
}

// pyFloat is repr() of a float.
func pyFloat(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case math.IsNaN(f):
		return "nan"
	}
	// Python: the shortest round-tripping digits, in exponent form when the decimal
	// exponent is below -4 or at least 16.
	e := strconv.FormatFloat(f, 'e', -1, 64)
	mant, expText, _ := strings.Cut(e, "e")
	exp, _ := strconv.Atoi(expText)
	if exp < -4 || exp >= 16 {
		sign := "+"
		if exp < 0 {
			sign, exp = "-", -exp
		}
		return mant + "e" + sign + leftPad(strconv.Itoa(exp), 2)
	}
	out := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsAny(out, ".") {
		out += ".0"
	}
	return out
}

func leftPad(s string, n int) string {
	for len(s) < n {
		s = "0" + s
	}
	return s
}
