package main

import "errors"

// runDev runs `coordd dev`: an embedded broker, three coordinators, two
// workers and a sample job in one process. [lead: to be written]
func runDev(args []string) error { return errors.New("not yet") }
