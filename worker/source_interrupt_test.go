package worker

import (
	"log/slog"
	"testing"

	"github.com/coordflow/coordflow/transport"
)

// A retarget breaks off, from outside the task loop, exactly the outputs to
// map tasks it moves to another worker in a newer attempt: the loop may be
// blocked sending to a frozen map task and would not reach the retarget.
func TestInterruptClosesOutputsToMovedMapTasks(t *testing.T) {
	s := &sourceTask{
		key: taskKey{job: "job", attempt: 1, id: "source-0"},
		log: slog.New(slog.DiscardHandler),
		mapTasks: []*transport.MapTaskRef{
			{TaskId: "map-0", WorkerId: "w1", Attempt: 1},
			{TaskId: "map-1", WorkerId: "w2", Attempt: 1},
		},
	}
	outs := []*fakeOutput{{}, {}}
	for o := range outs {
		s.outputs = append(s.outputs, outs[o])
		s.publish(o)
	}
	s.interrupt(&transport.RetargetTasks{JobId: "job", Attempt: 2, MapTasks: []*transport.MapTaskRef{
		{TaskId: "map-0", WorkerId: "w1", Attempt: 1},
		{TaskId: "map-1", WorkerId: "w3", Attempt: 2},
	}})
	if outs[0].isClosed() || !outs[1].isClosed() {
		t.Fatalf("closed: map-0 %v, map-1 %v; want only map-1's output, which the retarget moves", outs[0].isClosed(), outs[1].isClosed())
	}
	// An output the loop has marked lost is not closed again, and a stale
	// retarget (an older attempt) moves nothing.
	outs[1] = &fakeOutput{}
	s.outputs[1] = nil
	s.publish(1)
	s.interrupt(&transport.RetargetTasks{JobId: "job", Attempt: 1, MapTasks: []*transport.MapTaskRef{
		{TaskId: "map-0", WorkerId: "w9", Attempt: 1},
	}})
	if outs[0].isClosed() {
		t.Fatal("a retarget naming map-0 in its current attempt closed its output")
	}
}
