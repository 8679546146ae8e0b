// Package auth checks bearer tokens and roles like Python's loopmesh.mesh.auth: tokens are
// compared in constant time against every configured token, so timing tells nothing about
// which token (or which prefix) matched.
package auth

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Token is one configured credential.
type Token struct {
	Name   string
	Secret string
	Roles  []string
}

type token struct {
	name   string
	digest [sha256.Size]byte // compared instead of the secret: equal lengths, constant time
	roles  map[string]bool
}

// Auth is the set of tokens; with none, every call is let through.
type Auth struct{ tokens []token }

// New builds an Auth from the configured tokens.
func New(tokens []Token) *Auth {
	a := &Auth{}
	for _, t := range tokens {
		roles := map[string]bool{}
		for _, r := range t.Roles {
			roles[r] = true
		}
		a.tokens = append(a.tokens, token{t.Name, sha256.Sum256([]byte(t.Secret)), roles})
	}
	return a
}

// Enabled reports whether tokens are configured.
func (a *Auth) Enabled() bool { return len(a.tokens) > 0 }

// Open reports whether a method needs no token (health and reflection).
func Open(fullMethod string) bool {
	return strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/") ||
		strings.HasPrefix(fullMethod, "/grpc.reflection.")
}

// Check returns nil when the values of the call's "authorization" metadata carry a token
// holding role, else the status error to answer: UNAUTHENTICATED without a valid token,
// PERMISSION_DENIED without the role.
func (a *Auth) Check(authorization []string, role string) error {
	if !a.Enabled() {
		return nil
	}
	presented := bearer(authorization)
	var found *token
	if presented != nil {
		digest := sha256.Sum256(presented)
		for i := range a.tokens {
			// No early exit: every configured token is compared.
			if subtle.ConstantTimeCompare(a.tokens[i].digest[:], digest[:]) == 1 {
				found = &a.tokens[i]
			}
		}
	}
	if found == nil {
		return status.Error(codes.Unauthenticated, "missing or invalid bearer token")
	}
	if !found.roles[role] {
		return status.Errorf(codes.PermissionDenied, "token '%s' lacks role '%s'", found.name, role)
	}
	return nil
}

// CheckMethod is Check with the Python services' wording (loopmesh.mesh.auth
// TokenAuthInterceptor), for methods the Python process serves too: UNAUTHENTICATED
// "missing or invalid token", PERMISSION_DENIED "role '<role>' is needed for <method>".
func (a *Auth) CheckMethod(authorization []string, role, fullMethod string) error {
	if !a.Enabled() {
		return nil
	}
	err := a.Check(authorization, role)
	switch status.Code(err) {
	case codes.OK:
		return nil
	case codes.Unauthenticated:
		return status.Error(codes.Unauthenticated, "missing or invalid token")
	}
	return status.Errorf(codes.PermissionDenied, "role '%s' is needed for %s", role, fullMethod)
}

// bearer returns the token of the last "authorization: Bearer <token>" entry (scheme
// case-insensitive, surrounding whitespace stripped), or nil.
func bearer(authorization []string) []byte {
	var presented []byte
	for _, v := range authorization {
		if len(v) >= 7 && strings.EqualFold(v[:7], "bearer ") {
			presented = bytes.TrimSpace([]byte(v[7:]))
		}
	}
	if len(presented) == 0 {
		return nil
	}
	return presented
}
