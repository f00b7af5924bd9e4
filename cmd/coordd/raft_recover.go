package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/coordinator"
)

// raftRecover runs `coordd raft recover -data-dir DIR -peers FILE`: offline,
// on the data dir of a stopped coordinator, it replaces the Raft
// configuration with the servers FILE lists (hashicorp/raft's peers.json
// format) so that the coordinators left after a quorum loss can elect a
// leader. It talks to no coordinator.
func raftRecover(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("coordd raft recover", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "", "`DIR`: the -data-dir of the stopped coordinator to recover")
	peersFile := fs.String("peers", "", "`FILE`: JSON list of the coordinators of the new configuration, "+
		`[{"id": "c1", "address": "10.0.0.1:7001", "non_voter": false}, ...]`)
	format := fs.String("format", "table", "output `FORMAT`: table (sentences) or json ({\"data_dir\", \"index\", \"term\", \"jobs\", \"previous\", \"servers\"})")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: coordd raft recover -data-dir DIR -peers FILE

Recovers from the loss of a Raft quorum, offline: replaces the Raft
configuration in DIR with the coordinators FILE lists, keeping all the
node's state. Stop every coordinator first, run this with the same FILE on
each one FILE lists, then start them. See docs/operations.md
"Recovering a node / a lost quorum".

`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	switch {
	case fs.NArg() > 0:
		return usageError(fs, "unexpected argument %q", fs.Arg(0))
	case *dataDir == "" || *peersFile == "":
		return usageError(fs, "-data-dir and -peers are required")
	case *format != "table" && *format != "json":
		return usageError(fs, "-format %q: want table or json", *format)
	}
	conf, err := raft.ReadConfigJSON(*peersFile)
	if err != nil {
		return fmt.Errorf("read peers file %s: %w", *peersFile, err)
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	got, err := coordinator.RecoverCluster(*dataDir, conf.Servers, logger)
	if err != nil {
		return err
	}
	if *format == "json" {
		return json.NewEncoder(stdout).Encode(map[string]any{
			"data_dir": *dataDir, "index": got.Index, "term": got.Term, "jobs": got.Jobs,
			"previous": jsonServers(got.Previous), "servers": jsonServers(conf.Servers),
		})
	}
	fmt.Fprintf(stdout, "recovered %s at raft index %d (term %d) with %d jobs\n", *dataDir, got.Index, got.Term, got.Jobs)
	fmt.Fprintf(stdout, "raft configuration was: %s\n", describeServers(got.Previous))
	fmt.Fprintf(stdout, "raft configuration now: %s\n", describeServers(conf.Servers))
	fmt.Fprintln(stdout, "start each coordinator listed with its usual flags and the -raft-addr listed for it")
	return nil
}

// jsonServers is servers as -format json prints them: the fields of the
// peers file.
func jsonServers(servers []raft.Server) []map[string]any {
	out := make([]map[string]any, 0, len(servers))
	for _, s := range servers {
		out = append(out, map[string]any{"id": string(s.ID), "address": string(s.Address), "non_voter": s.Suffrage == raft.Nonvoter})
	}
	return out
}

// describeServers lists servers as "id (address, voter), ...".
func describeServers(servers []raft.Server) string {
	if len(servers) == 0 {
		return "(none)"
	}
	parts := make([]string, len(servers))
	for i, s := range servers {
		suffrage := "voter"
		if s.Suffrage != raft.Voter {
			suffrage = "nonvoter"
		}
		parts[i] = fmt.Sprintf("%s (%s, %s)", s.ID, s.Address, suffrage)
	}
	return strings.Join(parts, ", ")
}
