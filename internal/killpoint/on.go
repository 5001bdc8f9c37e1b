//go:build killpoints

package killpoint

import (
	"os"
	"syscall"
)

// At kills the process with SIGKILL (no defer, no cleanup runs) when step is
// the one EBPF_CNI_KILL_AT names.
func At(step string) {
	if os.Getenv(Env) == step {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is delivered before this returns
	}
}
