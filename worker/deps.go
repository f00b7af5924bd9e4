package worker

// Placeholder imports that pin the worker's dependencies in go.mod until the
// runtime uses them; delete this file once it does.
import (
	_ "github.com/IBM/sarama"
	_ "github.com/prometheus/client_golang/prometheus/promhttp"
)
