package worker

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"github.com/IBM/sarama"
)

// offsetCommit is one completed checkpoint's offsets for the source's own
// partitions.
type offsetCommit struct {
	checkpoint uint64
	offsets    map[int32]int64
}

// offsetCommitter commits the offsets of completed checkpoints to Kafka under
// the job's consumer group, for monitoring with standard Kafka tools only:
// recovery never reads them, so failures are logged and otherwise ignored,
// and a commit still waiting when a newer one arrives is replaced by it.
//
// It sends OffsetCommit straight to the group coordinator with generation -1
// (a standalone commit, as Kafka allows for groups without members) instead
// of using sarama's OffsetManager: that fetches the group's offsets first,
// which kfake answers with GROUP_ID_NOT_FOUND for a group it has never seen.
type offsetCommitter struct {
	client sarama.Client
	conf   *sarama.Config
	group  string
	topic  string
	log    *slog.Logger
	next   chan offsetCommit // capacity 1: the latest commit not yet sent
}

func newOffsetCommitter(client sarama.Client, conf *sarama.Config, group, topic string, log *slog.Logger) *offsetCommitter {
	return &offsetCommitter{client: client, conf: conf, group: group, topic: topic, log: log, next: make(chan offsetCommit, 1)}
}

// offer queues c, replacing a commit that has not been sent yet. It never
// blocks; only the source task loop calls it.
func (c *offsetCommitter) offer(oc offsetCommit) {
	select {
	case <-c.next:
	default:
	}
	select {
	case c.next <- oc:
	default:
	}
}

// run commits offered offsets until ctx ends.
func (c *offsetCommitter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case oc := <-c.next:
			if err := c.commit(oc); err != nil {
				c.log.Warn("commit offsets to Kafka failed (monitoring only)", "group", c.group, "checkpoint", oc.checkpoint, "err", err)
				_ = c.client.RefreshCoordinator(c.group)
			}
		}
	}
}

func (c *offsetCommitter) commit(oc offsetCommit) error {
	if len(oc.offsets) == 0 {
		return nil
	}
	broker, err := c.client.Coordinator(c.group)
	if err != nil {
		return fmt.Errorf("find coordinator of group %q: %w", c.group, err)
	}
	req := sarama.NewOffsetCommitRequest(c.conf, c.group)
	meta := fmt.Sprintf("coordflow checkpoint %d", oc.checkpoint)
	for p, off := range oc.offsets {
		req.AddBlock(c.topic, p, off, sarama.ReceiveTime, meta)
	}
	resp, err := broker.CommitOffset(req)
	if err != nil {
		return fmt.Errorf("offset commit request: %w", err)
	}
	var bad []string
	for p, kerr := range resp.Errors[c.topic] {
		if kerr != sarama.ErrNoError {
			bad = append(bad, fmt.Sprintf("%s/%d: %v", c.topic, p, kerr))
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("offset commit rejected: %s", strings.Join(bad, "; "))
	}
	c.log.Debug("committed offsets to Kafka", "group", c.group, "checkpoint", oc.checkpoint)
	return nil
}
