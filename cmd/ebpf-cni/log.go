package main

import (
	"encoding/json"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

// verb is one CNI command: it returns the result to print (nil for verbs
// without output) or an error.
type verb func(args *skel.CmdArgs) (types.Result, error)

// logged adapts a verb to skel: maps its error to a CNI error, prints its
// result in the config's cniVersion and, when the config names a logFile,
// appends one JSON line per call (command, CNI_* env, stdin, result or
// error). Nothing but the result ever goes to stdout.
func logged(command string, fn verb) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		start := time.Now()
		res, err := fn(args)
		err = toCNI(err)
		var out any
		if err == nil && res != nil {
			out = res
			err = toCNI(types.PrintResult(res, res.Version()))
		}
		writeLog(args.StdinData, command, start, out, err)
		return err
	}
}

func writeLog(stdin []byte, command string, start time.Time, result any, err error) {
	var conf struct {
		LogFile string `json:"logFile"`
	}
	if json.Unmarshal(stdin, &conf) != nil || conf.LogFile == "" {
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
		"stdin":    stdinForLog(stdin),
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
	f, oErr := os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if oErr != nil {
		return
	}
	defer f.Close()
	f.Write(append(line, '\n'))
}

func stdinForLog(stdin []byte) any {
	if json.Valid(stdin) {
		return json.RawMessage(stdin)
	}
	return string(stdin)
}
