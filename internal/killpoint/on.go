//go:build killpoints

package killpoint

import (
	"os"
	"syscall"
)

// Env names the step to die at.
const Env = "EBPF_CNI_KILL_AT"

// At kills the process with SIGKILL (no defer, no cleanup runs) when step is
// the one EBPF_CNI_KILL_AT names.
func At(step string) {
	if os.Getenv(Env) == step {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is delivered before this returns
	}
}
