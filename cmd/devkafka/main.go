// Command devkafka runs an embedded Kafka-protocol broker (kfake). [placeholder]
package main

import _ "github.com/twmb/franz-go/pkg/kfake"

func main() {}
