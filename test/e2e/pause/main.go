// Command pause is the sandbox ("pause") container of the e2e tests: it
// holds the pod's namespaces open and exits on SIGTERM or SIGINT. Built
// static and packed into an OCI image by tools/ociimage, since no registry
// is reachable to pull one.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
