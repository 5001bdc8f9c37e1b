package main

import (
	"encoding/json"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

// verb is one CNI command on the decoded config: it returns the result to
// print (nil for verbs without output) or an error.
type verb func(args *skel.CmdArgs, conf *config.NetConf) (types.Result, error)

// logged adapts a verb to skel: decodes stdin (once), maps the verb's error
// to a CNI error, prints its result in the config's cniVersion and, when the
// config names a logFile, appends one JSON line per call (command, CNI_*
// env, stdin, result or error). Nothing but the result goes to stdout.
func logged(command string, fn verb) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		start := time.Now()
		conf, err := config.Parse(args.StdinData)
		var res types.Result
		if err == nil {
			res, err = fn(args, conf)
		}
		err = toCNI(err)
		var out any
		if err == nil && res != nil {
			out = res
			err = toCNI(types.PrintResult(res, res.Version()))
		}
		if conf != nil {
			writeLog(conf.LogFile, args.StdinData, command, start, out, err)
		}
		return err
	}
}

func writeLog(logFile string, stdin []byte, command string, start time.Time, result any, err error) {
	if !strings.HasPrefix(logFile, "/") {
		return
	}
	env := map[string]string{}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CNI_") {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
	}
	entry := map[string]any{
		"time":     start.UTC().Format(time.RFC3339Nano),
		"command":  command,
		"duration": time.Since(start).String(),
		"env":      env,
		"stdin":    json.RawMessage(stdin), // Parse decoded it: valid JSON
	}
	if err != nil {
		entry["error"] = err
	} else if result != nil {
		entry["result"] = result
	}
	line, mErr := json.Marshal(entry)
	if mErr != nil {
		return
	}
	f, oErr := os.OpenFile(logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if oErr != nil {
		return
	}
	defer f.Close()
	f.Write(append(line, '\n'))
}
