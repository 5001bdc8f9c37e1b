package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// repair ("ebpf-cni repair", and "ebpf-cni upgrade", which the DaemonSet's
// install step runs after it copied a new build in) loads this build's
// datapath, which moves every attachment of an older build onto it and
// migrates renamed maps (loader.Ensure), then restores whatever the live
// pods' records say is missing.
func repair(verb string, argv []string, stdout, stderr io.Writer) error {
	fs, pinRoot, stateDir := nodeFlags(verb, stderr)
	if err := fs.Parse(argv); err != nil {
		return err
	}
	progs, err := loader.Ensure(*pinRoot)
	if err != nil {
		return err
	}
	err = progs.Upgrade()
	progs.Close()
	if err != nil {
		return err
	}
	n, err := endpoint.Restore(*stateDir, *pinRoot)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "datapath %s under %s; %d pod(s) repaired\n", loader.Tag(), *pinRoot, n)
	return nil
}

// nodeFlags is the flag set of an operator verb (inspect, monitor,
// upgrade, repair, uninstall) with the two flags each takes: the
// datapath's pin root and the state directory.
func nodeFlags(verb string, stderr io.Writer) (fs *flag.FlagSet, pinRoot, stateDir *string) {
	fs = flag.NewFlagSet(verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	pinRoot = fs.String("pin-root", config.DefaultPinRoot, "pin root of the datapath")
	stateDir = fs.String("state-dir", config.DefaultStateDir, "state directory")
	return fs, pinRoot, stateDir
}
