package auth

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestCheck(t *testing.T) {
	a := New([]Token{
		{Name: "app", Secret: "s3cret", Roles: []string{"predict"}},
		{Name: "ops", Secret: "other", Roles: []string{"operator"}},
	})
	cases := []struct {
		md   metadata.MD
		code codes.Code
		msg  string
	}{
		{metadata.Pairs("authorization", "Bearer s3cret"), codes.OK, ""},
		{metadata.Pairs("authorization", "bearer  s3cret "), codes.OK, ""},
		{metadata.Pairs("authorization", "Bearer wrong", "authorization", "Bearer s3cret"), codes.OK, ""},
		{metadata.MD{}, codes.Unauthenticated, "missing or invalid bearer token"},
		{metadata.Pairs("authorization", "Bearer "), codes.Unauthenticated, "missing or invalid bearer token"},
		{metadata.Pairs("authorization", "Basic s3cret"), codes.Unauthenticated, "missing or invalid bearer token"},
		{metadata.Pairs("authorization", "Bearer s3cre"), codes.Unauthenticated, "missing or invalid bearer token"},
		{metadata.Pairs("authorization", "Bearer other"), codes.PermissionDenied, "token 'ops' lacks role 'predict'"},
	}
	for _, c := range cases {
		err := a.Check(c.md.Get("authorization"), "predict")
		if s := status.Convert(err); s.Code() != c.code || (err != nil && s.Message() != c.msg) {
			t.Errorf("%v: got %v", c.md, err)
		}
	}
	if err := New(nil).Check(nil, "predict"); err != nil {
		t.Errorf("no tokens: %v", err)
	}
	if !Open("/grpc.health.v1.Health/Check") || !Open("/grpc.reflection.v1.ServerReflection/X") ||
		Open("/inference.GRPCInferenceService/ModelInfer") {
		t.Error("Open")
	}
}

func TestCheckMethodSpeaksLikePython(t *testing.T) {
	a := New([]Token{{Name: "ops", Secret: "s3cret", Roles: []string{"operator"}}})
	if err := a.CheckMethod(nil, "features", "/x.Y/Z"); status.Code(err) != codes.Unauthenticated || status.Convert(err).Message() != "missing or invalid token" {
		t.Fatal(err)
	}
	err := a.CheckMethod([]string{"Bearer s3cret"}, "features", "/x.Y/Z")
	if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "role 'features' is needed for /x.Y/Z" {
		t.Fatal(err)
	}
	if err := a.CheckMethod([]string{"Bearer s3cret"}, "operator", "/x.Y/Z"); err != nil {
		t.Fatal(err)
	}
	if err := New(nil).CheckMethod(nil, "features", "/x.Y/Z"); err != nil {
		t.Fatal(err)
	}
}
