// Package killpoint marks the steps of ADD and DEL where a crash test stops
// the process with SIGKILL, so every step is hit deterministically. Release
// builds compile At to nothing; a test binary built with -tags killpoints
// kills itself at the step named by the environment variable Env.
package killpoint

// Env names the step to die at (killpoints builds only).
const Env = "EBPF_CNI_KILL_AT"
