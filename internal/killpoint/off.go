//go:build !killpoints

// Package killpoint marks the steps of ADD and DEL where a crash test stops
// the process with SIGKILL, so every step is hit deterministically. Release
// builds compile At to nothing; a test binary built with -tags killpoints
// kills itself at the step named by EBPF_CNI_KILL_AT.
package killpoint

// At marks a step; it does nothing in a release build.
func At(string) {}
