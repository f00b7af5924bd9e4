package coordinator

// Placeholder imports that pin dependencies in go.mod until the code uses
// them; delete this file once it does.
import (
	_ "github.com/hashicorp/go-hclog"
	_ "github.com/hashicorp/raft-boltdb/v2"
	_ "github.com/prometheus/client_golang/prometheus/promhttp"
	_ "go.etcd.io/bbolt"
)
