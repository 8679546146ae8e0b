package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/proxy"
)

// writeCert writes a certificate (signed by parent, or self-signed) and its key as PEM files.
func writeCert(t *testing.T, dir, name string, isCA bool, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: isCA, BasicConstraintsValid: true, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	_ = os.WriteFile(filepath.Join(dir, name+".pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	_ = os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := writeCert(t, dir, "ca", true, nil, nil)
	writeCert(t, dir, "server", false, ca, caKey)
	writeCert(t, dir, "client", false, ca, caKey)
	path := func(name string) string { return filepath.Join(dir, name) }
	caFile := path("ca.pem")
	serverCreds, err := serverCredentials(&config.TLS{CertFile: path("server.pem"), KeyFile: path("server.key"), ClientCAFile: &caFile})
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(serverCreds), grpc.ForceServerCodecV2(proxy.Codec{}),
		grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error { return ss.SendMsg([]byte{}) }))
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { _ = s.Serve(lis) }()
	defer s.Stop()

	call := func(creds credentials.TransportCredentials) error {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodecV2(proxy.Codec{})))
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var resp []byte
		return conn.Invoke(ctx, "/x.Y/Z", []byte{}, &resp)
	}
	// The Triton client's TLS config doubles as a client here: CA plus client certificate.
	cert, key := path("client.pem"), path("client.key")
	withCert, err := tritonCredentials(&config.TritonTLS{CAFile: &caFile, CertFile: &cert, KeyFile: &key})
	if err != nil {
		t.Fatal(err)
	}
	if err := call(withCert); err != nil {
		t.Fatalf("with a client certificate: %v", err)
	}
	withoutCert, _ := tritonCredentials(&config.TritonTLS{CAFile: &caFile})
	if err := call(withoutCert); status.Code(err) != codes.Unavailable {
		t.Fatalf("without a client certificate: %v", err)
	}
}
