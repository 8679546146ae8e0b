// Package telemetry holds the data plane's JSON logs, Prometheus metrics and OpenTelemetry
// tracing.
package telemetry

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc/grpclog"
)

// Logger writes one JSON object per line, shaped like the Python services' logs.
type Logger struct {
	mu      sync.Mutex
	w       io.Writer
	service string
}

// NewLogger logs to w as service.
func NewLogger(w io.Writer, service string) *Logger { return &Logger{w: w, service: service} }

// SetService renames the service in later lines (once the config is read).
func (l *Logger) SetService(service string) {
	l.mu.Lock()
	l.service = service
	l.mu.Unlock()
}

// Info, Warn and Error log message with optional key/value pairs.
func (l *Logger) Info(msg string, kv ...any)  { l.log("INFO", msg, kv) }
func (l *Logger) Warn(msg string, kv ...any)  { l.log("WARNING", msg, kv) }
func (l *Logger) Error(msg string, kv ...any) { l.log("ERROR", msg, kv) }

func (l *Logger) log(level, msg string, kv []any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b bytes.Buffer
	field := func(k string, v any) {
		if b.Len() > 0 {
			b.WriteString(", ")
		} else {
			b.WriteByte('{')
		}
		key, _ := json.Marshal(k)
		val, err := json.Marshal(v)
		if err != nil {
			val, _ = json.Marshal(fmt.Sprint(v))
		}
		b.Write(key)
		b.WriteString(": ")
		b.Write(val)
	}
	field("ts", time.Now().Format("2006-01-02T15:04:05-0700"))
	field("level", level)
	field("service", l.service)
	field("logger", "dataplane")
	field("message", msg)
	for i := 0; i+1 < len(kv); i += 2 {
		if err, ok := kv[i+1].(error); ok {
			kv[i+1] = err.Error()
		}
		field(fmt.Sprint(kv[i]), kv[i+1])
	}
	b.WriteString("}\n")
	_, _ = l.w.Write(b.Bytes())
}

// InstallGRPCLogger sends gRPC's own warnings and errors through l (its info is dropped).
func InstallGRPCLogger(l *Logger) { grpclog.SetLoggerV2(grpcLogger{l}) }

type grpcLogger struct{ l *Logger }

func (grpcLogger) Info(...any)                   {}
func (grpcLogger) Infoln(...any)                 {}
func (grpcLogger) Infof(string, ...any)          {}
func (g grpcLogger) Warning(a ...any)            { g.l.Warn("grpc: " + fmt.Sprint(a...)) }
func (g grpcLogger) Warningln(a ...any)          { g.l.Warn("grpc: " + fmt.Sprint(a...)) }
func (g grpcLogger) Warningf(f string, a ...any) { g.l.Warn("grpc: " + fmt.Sprintf(f, a...)) }
func (g grpcLogger) Error(a ...any)              { g.l.Error("grpc: " + fmt.Sprint(a...)) }
func (g grpcLogger) Errorln(a ...any)            { g.l.Error("grpc: " + fmt.Sprint(a...)) }
func (g grpcLogger) Errorf(f string, a ...any)   { g.l.Error("grpc: " + fmt.Sprintf(f, a...)) }
func (g grpcLogger) Fatal(a ...any)              { g.l.Error("grpc: " + fmt.Sprint(a...)); os.Exit(1) }
func (g grpcLogger) Fatalln(a ...any)            { g.Fatal(a...) }
func (g grpcLogger) Fatalf(f string, a ...any)   { g.Fatal(fmt.Sprintf(f, a...)) }
func (grpcLogger) V(level int) bool              { return level <= 0 }
