package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary runs main itself when asked to, so the lifecycle is tested end to end:
// config on stdin, the one listening line, the admin API, SIGTERM, exit codes.
func TestMain(m *testing.M) {
	if os.Getenv("DATAPLANE_RUN_MAIN") == "1" {
		os.Args = append([]string{"loopmesh-dataplane"}, strings.Fields(os.Getenv("DATAPLANE_ARGS"))...)
		os.Exit(run())
	}
	os.Exit(m.Run())
}

func start(t *testing.T, config string, args ...string) (*exec.Cmd, io.Reader, *strings.Builder) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "DATAPLANE_RUN_MAIN=1", "DATAPLANE_ARGS="+strings.Join(args, " "))
	cmd.Stdin = strings.NewReader(config)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return cmd, stdout, &stderr
}

func exitCode(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(15 * time.Second):
		t.Fatal("did not exit")
	}
	return -1
}

func TestLifecycle(t *testing.T) {
	cmd, stdout, stderr := start(t, `{"backend": "127.0.0.1:1", "triton": {"address": "127.0.0.1:1"},
		"metrics_listen": "127.0.0.1:0"}`, "--config", "-")
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("%v; stderr: %s", err, stderr)
	}
	var said struct {
		Event, GRPC, Admin string
		Metrics            *string
	}
	if err := json.Unmarshal([]byte(line), &said); err != nil || said.Event != "listening" || said.Metrics == nil {
		t.Fatalf("%q %v", line, err)
	}
	for _, url := range []string{"http://" + said.Admin + "/healthz", "http://" + *said.Metrics + "/metrics"} {
		resp, err := http.Get(url)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", url, resp, err)
		}
		resp.Body.Close()
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if code := exitCode(t, cmd); code != 0 {
		t.Fatalf("exit %d; stderr: %s", code, stderr)
	}
	for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var entry map[string]any
		if json.Unmarshal([]byte(l), &entry) != nil || entry["service"] != "inference-dataplane" {
			t.Fatalf("not a JSON log line: %q", l)
		}
	}
}

func TestConfigErrorExits2(t *testing.T) {
	for config, want := range map[string]string{
		`{"backend": "127.0.0.1:1", "triton": {"address": "127.0.0.1:1"}, "colour": 1}`:                                        `unknown key \"colour\"`,
		`{"backend": "127.0.0.1:1", "triton": {"address": "127.0.0.1:1"}, "tls": {"cert_file": "/nope", "key_file": "/nope"}}`: "tls: open /nope",
	} {
		cmd, _, stderr := start(t, config, "--config", "-")
		if code := exitCode(t, cmd); code != 2 || !strings.Contains(stderr.String(), want) {
			t.Errorf("exit %d, stderr %s; want 2 and %s", code, stderr, want)
		}
	}
}

// Features mode: the control plane keeps stdin open; when it closes (the parent died, even
// by SIGKILL) the data plane stops by itself and frees the port.
func TestFeaturesModeStopsWhenStdinCloses(t *testing.T) {
	config := `{"mode": "features", "backend": "127.0.0.1:1", "stop_on_stdin_eof": true, "service_name": "features-dataplane",
	 "features": {"max_entities": 10, "store_timeout_s": 1, "features": [{"view": "v", "name": "f", "join_key": "entity_id"}],
	 "views": {"v": {"table": "p_v", "name": "v"}}, "store": {"type": "sqlite", "path": "/nonexistent/x.db", "entity_key_serialization_version": 3}}}`
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "DATAPLANE_RUN_MAIN=1", "DATAPLANE_ARGS=--config -")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	_, _ = io.WriteString(stdin, config)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.Contains(line, `"listening"`) {
		t.Fatalf("%q %v; stderr: %s", line, err, &stderr)
	}
	resp, err := http.Get("http://" + adminOf(t, line) + "/features")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	resp.Body.Close()
	stdin.Close()
	if code := exitCode(t, cmd); code != 0 || !strings.Contains(stderr.String(), "standard input closed") {
		t.Fatalf("exit %d; stderr: %s", code, &stderr)
	}
}

func adminOf(t *testing.T, line string) string {
	t.Helper()
	var said struct{ Admin string }
	if err := json.Unmarshal([]byte(line), &said); err != nil {
		t.Fatal(err)
	}
	return said.Admin
}
