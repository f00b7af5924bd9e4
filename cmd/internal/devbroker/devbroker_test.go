package devbroker

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

func TestParseTopic(t *testing.T) {
	for _, tc := range []struct {
		in    string
		name  string
		parts int32
		ok    bool
	}{
		{"words:4", "words", 4, true},
		{"a.b_c-D9:1", "a.b_c-D9", 1, true},
		{"words", "", 0, false},
		{"words:", "", 0, false},
		{"words:x", "", 0, false},
		{"words:0", "", 0, false},
		{"words:-1", "", 0, false},
		{":3", "", 0, false},
		{"..:3", "", 0, false},
		{"bad name:3", "", 0, false},
		{"words:99999999999", "", 0, false},
	} {
		name, parts, err := ParseTopic(tc.in)
		if (err == nil) != tc.ok || name != tc.name || parts != tc.parts {
			t.Errorf("ParseTopic(%q) = %q, %d, %v; want %q, %d, ok=%v", tc.in, name, parts, err, tc.name, tc.parts, tc.ok)
		}
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Addr: "0.0.0.0:0"},
		{Addr: ":0"},
		{Addr: "127.0.0.1"},
		{Addr: "127.0.0.1:99999"},
		{Addr: "127.0.0.1:0", Topics: map[string]int32{"t": 0}},
		{Addr: "127.0.0.1:0", Topics: map[string]int32{"a b": 1}},
	} {
		b, err := Start(context.Background(), cfg)
		if !errors.Is(err, ErrConfig) {
			if b != nil {
				b.Close()
			}
			t.Errorf("Start(%+v) = %v, want ErrConfig", cfg, err)
		}
	}
}

// TestRestartKeepsTopicsAndRecords starts a broker on a data dir, writes a
// record, closes it and starts it again with one more topic: the record is
// still there and the new topic is created.
func TestRestartKeepsTopicsAndRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	b, err := Start(ctx, Config{Addr: "127.0.0.1:0", Topics: map[string]int32{"words": 3}, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	cfg := sarama.NewConfig()
	cfg.Producer.Return.Successes = true
	cfg.Producer.Partitioner = sarama.NewManualPartitioner
	p, err := sarama.NewSyncProducer([]string{b.Addr()}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.SendMessage(&sarama.ProducerMessage{Topic: "words", Partition: 2, Value: sarama.StringEncoder("kept")}); err != nil {
		t.Fatal(err)
	}
	p.Close()
	b.Close()

	b, err = Start(ctx, Config{Addr: "127.0.0.1:0", Topics: map[string]int32{"words": 5, "counts": 2}, DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	cl, err := sarama.NewClient([]string{b.Addr()}, sarama.NewConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	for topic, want := range map[string]int{"words": 3, "counts": 2} {
		parts, err := cl.Partitions(topic)
		if err != nil || len(parts) != want {
			t.Errorf("topic %s: partitions %v, %v; want %d", topic, parts, err, want)
		}
	}
	if end, err := cl.GetOffset("words", 2, sarama.OffsetNewest); err != nil || end != 1 {
		t.Errorf("words/2 end offset after restart: %d, %v; want 1", end, err)
	}
}

func TestStartHonoursContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b, err := Start(ctx, Config{Addr: "127.0.0.1:0"})
	if err == nil {
		b.Close()
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Start with a cancelled context: %v", err)
	}
}
