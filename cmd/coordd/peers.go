package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"

	"github.com/coordflow/coordflow/transport"
)

// runKeygen prints `coordd keygen`: a new gossip encryption key for -encrypt
// (32 random bytes, base64), alone on a line.
func runKeygen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("coordd keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	format := fs.String("format", "table", "output `FORMAT`: table (the key alone) or json ({\"key\": ...})")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: coordd keygen [-format json]\n\nPrints a new gossip encryption key (%d random bytes, base64) for coordd agent and workerd -encrypt or -encrypt-file.\n\n", transport.GossipKeySize)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *format != "table" && *format != "json" {
		return usageError(fs, "-format %q: want table or json", *format)
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected argument %q", fs.Arg(0))
	}
	key, err := transport.NewGossipKey()
	if err != nil {
		return err
	}
	if *format == "json" {
		return json.NewEncoder(stdout).Encode(map[string]string{"key": key})
	}
	_, err = fmt.Fprintln(stdout, key)
	return err
}

// raftAddPeer adds a coordinator to the Raft configuration through any
// coordinator (a follower forwards to the leader): POST /v1/raft/peers. The
// peer's Raft address is -raft-addr, as on coordd agent: -addr is the API's,
// as on every CLI command.
func raftAddPeer(args []string, stdout, stderr io.Writer) error {
	var id, raftAddr string
	var nonVoter bool
	c, _, err := parseCLI("raft add-peer", "", args, stderr, func(fs *flag.FlagSet) {
		fs.StringVar(&id, "id", "", "`ID` of the coordinator to add (its -id)")
		fs.StringVar(&raftAddr, "raft-addr", "", "its Raft `host:port` (its -raft-addr)")
		fs.BoolVar(&nonVoter, "non-voter", false, "add it as a nonvoter: it replicates and serves reads but never votes")
	})
	if err != nil {
		return err
	}
	if id == "" || raftAddr == "" {
		fmt.Fprintln(stderr, "coordd raft add-peer: -id and -raft-addr are required")
		return errUsage
	}
	voter := !nonVoter
	body, err := json.Marshal(map[string]any{"id": id, "address": raftAddr, "voter": voter})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	data, err := c.do(ctx, http.MethodPost, "/v1/raft/peers", body)
	if err != nil {
		return err
	}
	if c.jsonOut {
		return writeJSON(stdout, data)
	}
	var out struct {
		Changed bool `json:"changed"`
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return fmt.Errorf("POST /v1/raft/peers: decode answer: %w", err)
	}
	suffrage := "voter"
	if nonVoter {
		suffrage = "nonvoter"
	}
	if !out.Changed {
		fmt.Fprintf(stdout, "%s is a %s at %s already\n", id, suffrage, raftAddr)
		return nil
	}
	fmt.Fprintf(stdout, "added %s as a %s at %s to the raft configuration\n", id, suffrage, raftAddr)
	return nil
}
