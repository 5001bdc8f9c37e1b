package main

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"time"
)

// startupBin is one plugin binary whose start-up is timed.
type startupBin struct {
	label, path string
}

// startupResult is one binary's figures over every round.
type startupResult struct {
	label    string
	size     int64
	wallUS   []float64 // per-round median wall time of one CNI_COMMAND=VERSION exec, µs
	ratio    []float64 // per-round ratio to the first reference (ptp)
	minflt   []float64 // per-round median minor page faults
	cpuUS    []float64 // per-round median user+sys CPU, µs
	static   bool
	stripped bool
}

// runStartup times `CNI_COMMAND=VERSION <plugin>`: the whole process, as
// every ADD and DEL pays it before doing any work. The binaries alternate
// exec by exec (A B C A B C ...), so a drift of the machine hits all alike;
// each round's median is compared within the round.
func runStartup(rep *report) error {
	bins := []startupBin{
		{"ptp (Debian 12, /usr/lib/cni)", "/usr/lib/cni/ptp"},
		{"ptp v1.9.0 (built with this Go)", "/usr/local/lib/ebpf-cni/cni-plugins/ptp"},
		{"ebpf-cni", *plugin},
	}
	const perRound = 60
	res := make([]*startupResult, len(bins))
	for i, b := range bins {
		fi, err := os.Stat(b.path)
		if err != nil {
			return fmt.Errorf("start-up: %w", err)
		}
		res[i] = &startupResult{label: b.label, size: fi.Size()}
		if out, err := exec.Command("file", "-L", b.path).Output(); err == nil {
			res[i].static = !slices.Contains(splitWords(string(out)), "dynamically")
			res[i].stripped = !slices.Contains(splitWords(string(out)), "not")
		}
	}
	for round := 0; round < *rounds; round++ {
		wall := make([][]float64, len(bins))
		flt := make([][]float64, len(bins))
		cpu := make([][]float64, len(bins))
		for range perRound {
			for i, b := range bins {
				w, f, c, err := versionOnce(b.path)
				if err != nil {
					return err
				}
				wall[i], flt[i], cpu[i] = append(wall[i], w), append(flt[i], f), append(cpu[i], c)
			}
		}
		for i := range bins {
			res[i].wallUS = append(res[i].wallUS, median(wall[i]))
			res[i].minflt = append(res[i].minflt, median(flt[i]))
			res[i].cpuUS = append(res[i].cpuUS, median(cpu[i]))
			res[i].ratio = append(res[i].ratio, median(wall[i])/median(wall[0]))
		}
	}
	rep.startup = res
	return nil
}

func splitWords(s string) []string {
	var out []string
	word := []rune{}
	for _, r := range s {
		if r == ' ' || r == ',' || r == '\n' {
			if len(word) > 0 {
				out = append(out, string(word))
				word = word[:0]
			}
			continue
		}
		word = append(word, r)
	}
	return append(out, string(word))
}

// versionOnce runs one VERSION call and returns its wall time (µs), minor
// page faults and CPU time (µs).
func versionOnce(path string) (wall, minflt, cpu float64, err error) {
	cmd := exec.Command(path)
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	cmd.Stdin, cmd.Stdout = nil, nil
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, 0, fmt.Errorf("%s VERSION: %w", path, err)
	}
	wall = float64(time.Since(start).Microseconds())
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		minflt = float64(ru.Minflt)
		cpu = float64(ru.Utime.Usec+ru.Stime.Usec) + 1e6*float64(ru.Utime.Sec+ru.Stime.Sec)
	}
	return wall, minflt, cpu, nil
}

func (r *report) writeStartup(w func(string, ...any)) {
	if len(r.startup) == 0 {
		return
	}
	w("\n## Start-up: one `CNI_COMMAND=VERSION` call\n\n")
	w("Every ADD and DEL starts the plugin binary first. Wall time of the whole process (fork/exec from the bench, "+
		"the same for every binary), %d rounds of 60 calls per binary, the binaries alternating call by call; each "+
		"cell is the median over rounds of the per-round median, the ratio the median of per-round ratios to Debian's ptp.\n\n", *rounds)
	w("| binary | wall µs | × ptp (Debian) | CPU µs | minor faults | size MiB | static | stripped |\n|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.startup {
		w("| %s | %.0f | %.3f | %.0f | %.0f | %.1f | %v | %v |\n", s.label, median(s.wallUS), median(s.ratio),
			median(s.cpuUS), median(s.minflt), float64(s.size)/(1<<20), s.static, s.stripped)
	}
}
