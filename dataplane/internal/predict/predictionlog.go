package predict

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/loopmesh/loopmesh/dataplane/internal/config"
	"github.com/loopmesh/loopmesh/dataplane/internal/telemetry"
)

// Schema is PredictionLogged's schema header and field ("prediction.v1").
const Schema = "prediction.v1"

// Sink takes each answered prediction's record; it never blocks the answer.
type Sink interface{ Log(r *Record) }

// PredictionLog produces each record to the predictions topic as a PredictionLogged event,
// as the control plane's EventProducer would: the JSON of loopmesh.mesh.events.PredictionLogged
// (that Pydantic model stays its one definition: testdata/prediction_logged.json is checked
// against it on both sides), keyed by prediction id (Kafka's murmur2 partitioning, as
// aiokafka's), with the event_id, schema, content-type and trace headers, idempotent with
// acks from every in-sync replica. Records wait in the client's buffer (bounded: a full
// buffer drops the record and counts it, the answer never waits) while the brokers are away.
type PredictionLog struct {
	client  *kgo.Client
	topic   string
	tracing *telemetry.Tracing
	log     *telemetry.Logger
	metrics *telemetry.Metrics

	logged, dropped           atomic.Int64 // since the last Drain
	totalLogged, totalDropped atomic.Int64
	lastWarn                  atomic.Int64   // unix seconds of the last failure warning
	unsettled                 sync.WaitGroup // records whose promise has not run yet
}

// LogCounts are the records logged and dropped (buffer full or failed) since the last drain.
type LogCounts struct {
	Logged  int64 `json:"logged"`
	Dropped int64 `json:"dropped"`
}

// NewPredictionLog connects a producer as c says; queue bounds the records buffered.
func NewPredictionLog(c *config.PredictLog, queue int, tracing *telemetry.Tracing, metrics *telemetry.Metrics, log *telemetry.Logger) (*PredictionLog, error) {
	opts := []kgo.Opt{
		kgo.SeedBrokers(c.Brokers...),
		kgo.ClientID(c.ClientID),
		kgo.DefaultProduceTopic(c.Topic),
		kgo.RequiredAcks(kgo.AllISRAcks()),                   // idempotent, as every LoopMesh producer
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)), // nil: Kafka's murmur2, as aiokafka
		kgo.ProducerBatchCompression(kgo.NoCompression()),    // consumers need no codec
		kgo.ProducerLinger(time.Duration(c.LingerMs * float64(time.Millisecond))),
		kgo.MaxBufferedRecords(queue),
		// Batches stay within franz-go's default size, Kafka's default message.max.bytes: a
		// prediction is small, and a larger batch would be refused whole by such a broker.
		kgo.ProduceRequestTimeout(time.Duration(c.RequestTimeoutMs) * time.Millisecond),
	}
	tlsConf, err := c.TLSConfig()
	if err != nil {
		return nil, fmt.Errorf("predict.log.%v", err)
	}
	if tlsConf != nil {
		opts = append(opts, kgo.DialTLSConfig(tlsConf))
	}
	if c.SASLMechanism != nil {
		user, password := *c.SASLUsername, ""
		if c.SASLPassword != nil {
			password = *c.SASLPassword
		}
		switch *c.SASLMechanism {
		case "PLAIN":
			opts = append(opts, kgo.SASL(plain.Auth{User: user, Pass: password}.AsMechanism()))
		case "SCRAM-SHA-256":
			opts = append(opts, kgo.SASL(scram.Auth{User: user, Pass: password}.AsSha256Mechanism()))
		case "SCRAM-SHA-512":
			opts = append(opts, kgo.SASL(scram.Auth{User: user, Pass: password}.AsSha512Mechanism()))
		}
	}
	client, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("predict.log: %v", err)
	}
	return &PredictionLog{client: client, topic: c.Topic, tracing: tracing, metrics: metrics, log: log}, nil
}

// event is PredictionLogged's JSON, its fields in the model's order.
type event struct {
	EventID   string `json:"event_id"`
	Schema    string `json:"schema"`
	EventTime string `json:"event_time"`
	*Record
}

// Encode returns r as the PredictionLogged event with id eventID (its JSON).
func Encode(r *Record, eventID string) ([]byte, error) {
	return json.Marshal(event{EventID: eventID, Schema: Schema, EventTime: r.EventTime, Record: r})
}

// Log produces r; it never blocks: a full buffer drops r (counted).
func (l *PredictionLog) Log(r *Record) {
	id := newID()
	value, err := Encode(r, id)
	if err != nil { // only non-finite numbers, which Predict never answers with
		l.settled(err)
		return
	}
	headers := []kgo.RecordHeader{
		{Key: "event_id", Value: []byte(id)},
		{Key: "schema", Value: []byte(Schema)},
		{Key: "content-type", Value: []byte("application/json")},
	}
	// The message carries its own PRODUCER span, under the Predict it logs: the joiner that
	// consumes it continues that trace.
	span, trace := l.tracing.StartProducer(r.Traceparent, r.Tracestate, l.topic+" publish", l.topic)
	for _, h := range trace {
		headers = append(headers, kgo.RecordHeader{Key: h[0], Value: []byte(h[1])})
	}
	record := &kgo.Record{Key: []byte(r.PredictionID), Value: value, Headers: headers}
	l.unsettled.Add(1)
	l.client.TryProduce(context.Background(), record, func(_ *kgo.Record, err error) {
		telemetry.EndSpan(span, err)
		l.settled(err)
		l.unsettled.Done()
	})
}

func (l *PredictionLog) settled(err error) {
	if err == nil {
		l.logged.Add(1)
		l.totalLogged.Add(1)
		l.metrics.PredictionLogged("logged")
	} else {
		l.dropped.Add(1)
		l.totalDropped.Add(1)
		if errors.Is(err, kgo.ErrMaxBuffered) {
			l.metrics.PredictionLogged("dropped")
		} else {
			l.metrics.PredictionLogged("failed")
			now := time.Now().Unix()
			if last := l.lastWarn.Load(); now-last >= 10 && l.lastWarn.CompareAndSwap(last, now) {
				l.log.Warn("logging a prediction failed", "topic", l.topic, "error", err.Error())
			}
		}
	}
}

// Drain returns the counts since the previous drain.
func (l *PredictionLog) Drain() LogCounts {
	return LogCounts{Logged: l.logged.Swap(0), Dropped: l.dropped.Swap(0)}
}

// Totals are the counts since the start.
func (l *PredictionLog) Totals() LogCounts {
	return LogCounts{Logged: l.totalLogged.Load(), Dropped: l.totalDropped.Load()}
}

// Close waits up to timeout for the buffered records to be acknowledged, then closes the
// client; false when some were left (they are lost, and counted as dropped by the time Close
// returns).
func (l *PredictionLog) Close(timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	flushed := l.client.Flush(ctx) == nil
	l.client.Close()   // fails what is left, through each record's promise...
	l.unsettled.Wait() // ...which runs on the client's goroutine, maybe after Close returned
	return flushed
}
