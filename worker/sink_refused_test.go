package worker

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// refuseTopic has cluster c answer every metadata request for topic alone
// with kerr for it, as a broker does to a client whose ACLs do not let it
// see the topic. Other metadata requests are the broker's own.
func refuseTopic(t *testing.T, c *kfake.Cluster, topic string, kerr sarama.KError) {
	t.Helper()
	host, portStr, err := net.SplitHostPort(c.ListenAddrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatal(err)
	}
	c.ControlKey(int16(kmsg.Metadata), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		md := req.(*kmsg.MetadataRequest)
		if len(md.Topics) != 1 || md.Topics[0].Topic == nil || *md.Topics[0].Topic != topic {
			return nil, nil, false
		}
		resp := md.ResponseKind().(*kmsg.MetadataResponse)
		b := kmsg.NewMetadataResponseBroker()
		b.NodeID, b.Host, b.Port = 0, host, int32(port)
		resp.Brokers = append(resp.Brokers, b)
		resp.ControllerID = 0
		rt := kmsg.NewMetadataResponseTopic()
		rt.Topic = kmsg.StringPtr(topic)
		rt.ErrorCode = int16(kerr)
		resp.Topics = append(resp.Topics, rt)
		return resp, nil, true
	})
}

// TestMapTaskFailsWhenTheBrokerRefusesItsSinkTopic: a broker that refuses
// the sink topic's look-up (TOPIC_AUTHORIZATION_FAILED: the worker's
// principal may not see it) fails the map task with a reason that names the
// topic and the refusal, as the same answer to a write does, whether the
// refusal meets the task at its deploy or while its sink is held for a
// missing topic. Holding instead would decline every checkpoint until
// someone looked; a restart shows the reason and backs off.
func TestMapTaskFailsWhenTheBrokerRefusesItsSinkTopic(t *testing.T) {
	for _, when := range []string{"at deploy", "while held for a missing topic"} {
		t.Run(when, func(t *testing.T) {
			opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(1, "nums")}
			if when == "at deploy" {
				opts = append(opts, kfake.SeedTopics(1, "sums"))
			}
			c, err := kfake.NewCluster(opts...)
			if err != nil {
				t.Fatalf("start kfake: %v", err)
			}
			t.Cleanup(c.Close)
			brokers := c.ListenAddrs()
			produce(t, brokers, "nums", []record{{0, "a", "1"}})

			var md *transport.DeployTask
			var f *fakeCoord
			if when == "at deploy" {
				refuseTopic(t, c, "sums", sarama.ErrTopicAuthorizationFailed)
				f = newFakeCoord(t, true, "")
				w := startWorker(t, "w1", f, nil)
				md = mapDeploy("sum", 1, operator.Sum, 1, 128, mapRefs(128, w), 0)
				md.Sink = &transport.SinkSpec{Brokers: brokers, Topic: "sums", Delivery: "at_least_once"}
				f.deploy(t, "w1", md)
			} else {
				j := startSinkJob(t, brokers)
				j.declineWhileMissing(t, 0, 0, 1)
				j.noFailure(t)
				refuseTopic(t, c, "sums", sarama.ErrTopicAuthorizationFailed)
				f, md = j.f, j.md
			}
			reason := f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_FAILED)
			if !strings.Contains(reason, `sink topic "sums"`) || !strings.Contains(reason, sarama.ErrTopicAuthorizationFailed.Error()) {
				t.Fatalf("map task failed with %q; want the topic and the broker's refusal named", reason)
			}
			if testing.Verbose() {
				t.Log(reason)
			}
		})
	}
}
