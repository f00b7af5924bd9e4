package transport

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
)

// TestNodeMetaValidate: what every member checks in another's gossip meta,
// each refusal naming its field.
func TestNodeMetaValidate(t *testing.T) {
	worker := NodeMeta{Role: RoleWorker, DataAddr: "127.0.0.1:7401", Slots: 4}
	coord := NodeMeta{Role: RoleCoordinator, RaftAddr: "10.0.0.1:7001", RPCAddr: "[::1]:7101", HTTPAddr: "c1.example:7201", Voter: true}
	with := func(m NodeMeta, f func(*NodeMeta)) NodeMeta { f(&m); return m }
	for _, tc := range []struct {
		name  string
		meta  NodeMeta
		field string // "" valid
	}{
		{"worker", worker, ""},
		{"coordinator", coord, ""},
		{"leaving worker", with(worker, func(m *NodeMeta) { m.Leaving = true }), ""},
		{"coordinator without addresses", NodeMeta{Role: RoleCoordinator}, ""},
		{"max slots", with(worker, func(m *NodeMeta) { m.Slots = MaxSlots }), ""},
		{"no role", NodeMeta{}, "role"},
		{"unknown role", with(worker, func(m *NodeMeta) { m.Role = "root" }), "role"},
		{"zero slots", with(worker, func(m *NodeMeta) { m.Slots = 0 }), "slots"},
		{"negative slots", with(worker, func(m *NodeMeta) { m.Slots = -1 }), "slots"},
		{"too many slots", with(worker, func(m *NodeMeta) { m.Slots = MaxSlots + 1 }), "slots"},
		{"MaxInt64 slots", with(worker, func(m *NodeMeta) { m.Slots = math.MaxInt64 }), "slots"},
		{"no data addr", with(worker, func(m *NodeMeta) { m.DataAddr = "" }), "data_addr"},
		{"data addr without port", with(worker, func(m *NodeMeta) { m.DataAddr = "127.0.0.1" }), "data_addr"},
		{"data addr port 0", with(worker, func(m *NodeMeta) { m.DataAddr = "127.0.0.1:0" }), "data_addr"},
		{"data addr port 65536", with(worker, func(m *NodeMeta) { m.DataAddr = "127.0.0.1:65536" }), "data_addr"},
		{"data addr named port", with(worker, func(m *NodeMeta) { m.DataAddr = "127.0.0.1:http" }), "data_addr"},
		{"data addr no host", with(worker, func(m *NodeMeta) { m.DataAddr = ":7401" }), "data_addr"},
		{"data addr control char", with(worker, func(m *NodeMeta) { m.DataAddr = "a\nb:7401" }), "data_addr"},
		{"data addr long host", with(worker, func(m *NodeMeta) { m.DataAddr = strings.Repeat("a", 254) + ":1" }), "data_addr"},
		{"worker with raft addr", with(worker, func(m *NodeMeta) { m.RaftAddr = "127.0.0.1:7001" }), "raft_addr"},
		{"worker voter", with(worker, func(m *NodeMeta) { m.Voter = true }), "voter"},
		{"bad raft addr", with(coord, func(m *NodeMeta) { m.RaftAddr = "127.0.0.1:-1" }), "raft_addr"},
		{"bad rpc addr", with(coord, func(m *NodeMeta) { m.RPCAddr = "x" }), "rpc_addr"},
		{"bad http addr", with(coord, func(m *NodeMeta) { m.HTTPAddr = "x:99999" }), "http_addr"},
		{"coordinator with slots", with(coord, func(m *NodeMeta) { m.Slots = 4 }), "slots"},
		{"coordinator with data addr", with(coord, func(m *NodeMeta) { m.DataAddr = "127.0.0.1:1" }), "data_addr"},
		{"feature level", with(worker, func(m *NodeMeta) { m.FeatureLevel = FeatureLevel }), ""},
		{"coordinator feature level", with(coord, func(m *NodeMeta) { m.FeatureLevel = FeatureLevel }), ""},
		{"negative feature level", with(worker, func(m *NodeMeta) { m.FeatureLevel = -1 }), "feature_level"},
		{"huge feature level", with(coord, func(m *NodeMeta) { m.FeatureLevel = math.MaxInt }), "feature_level"},
	} {
		err := tc.meta.Validate()
		var me *MetaError
		switch {
		case tc.field == "" && err != nil:
			t.Errorf("%s: %v, want valid", tc.name, err)
		case tc.field != "" && (!errors.As(err, &me) || me.Field != tc.field):
			t.Errorf("%s: %v, want an error naming %s", tc.name, err, tc.field)
		}
		// Encode refuses what Decode would refuse.
		b, encErr := tc.meta.Encode()
		if (encErr == nil) != (tc.field == "") {
			t.Errorf("%s: Encode: %v", tc.name, encErr)
		}
		if tc.field != "" {
			if b, err = json.Marshal(tc.meta); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := DecodeNodeMeta(b); (err == nil) != (tc.field == "") || (err != nil && !errors.As(err, &me)) {
			t.Errorf("%s: DecodeNodeMeta: %v", tc.name, err)
		}
	}
}

func TestDecodeNodeMeta(t *testing.T) {
	for _, tc := range []struct {
		name, meta, field string
	}{
		{"empty", "", "meta"},
		{"not json", "{", "meta"},
		{"too big", `{"role":"worker","data_addr":"127.0.0.1:1","slots":1,"x":"` + strings.Repeat("a", MaxMetaSize) + `"}`, "meta"},
		{"slots overflow int", `{"role":"worker","data_addr":"127.0.0.1:1","slots":1e30}`, "meta"},
		{"unknown field is fine", `{"role":"worker","data_addr":"127.0.0.1:1","slots":1,"zone":"a"}`, ""},
	} {
		_, err := DecodeNodeMeta([]byte(tc.meta))
		var me *MetaError
		if tc.field == "" && err != nil || tc.field != "" && (!errors.As(err, &me) || me.Field != tc.field) {
			t.Errorf("%s: %v, want field %q", tc.name, err, tc.field)
		}
	}
	if _, err := DecodeMember("w 1", []byte(`{"role":"worker","data_addr":"127.0.0.1:1","slots":1}`)); err == nil || !strings.Contains(err.Error(), "id") {
		t.Errorf("DecodeMember with a bad name: %v", err)
	}
}

func TestValidateID(t *testing.T) {
	for id, ok := range map[string]bool{
		"c1": true, "w-1.a_b": true, "9": true, strings.Repeat("a", 128): true,
		"": false, "-c1": false, ".c1": false, "c 1": false, "c1/x": false, "é": false, strings.Repeat("a", 129): false,
	} {
		if err := ValidateID(id); (err == nil) != ok {
			t.Errorf("ValidateID(%q) = %v, want ok %t", id, err, ok)
		}
	}
}
