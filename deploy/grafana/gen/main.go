// Command gen writes spire-healer's Grafana dashboard and checks dashboard
// files against the schema of Grafana's foundation SDK.
//
//	gen -out deploy/grafana/spire-healer.json   # generate
//	gen -check deploy/grafana/spire-healer.json # strict decode + Validate()
//
// The dashboard is built with the SDK's builders, so what we ship is what
// the SDK's schema (Grafana 11/12 dashboards, schemaVersion 42) describes;
// `-check` decodes a file strictly (unknown fields and wrong types are
// errors) and runs the schema's validation. Project-specific rules (PromQL,
// metric names, units, grid) are checked by the Rust test
// tests/it/dashboard.rs.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

func main() {
	out := flag.String("out", "", "write the generated dashboard to this file ('-' for stdout)")
	check := flag.String("check", "", "strictly decode and validate this dashboard file")
	flag.Parse()
	if (*out == "") == (*check == "") {
		fmt.Fprintln(os.Stderr, "usage: gen -out FILE | gen -check FILE")
		os.Exit(64)
	}
	if *check != "" {
		if err := checkFile(*check); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", *check, err)
			os.Exit(1)
		}
		fmt.Printf("%s: strict decoding and Validate() passed\n", *check)
		return
	}
	text, err := generate()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the dashboard: %v\n", err)
		os.Exit(1)
	}
	if *out == "-" {
		_, err = os.Stdout.Write(text)
	} else {
		err = os.WriteFile(*out, text, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// generate builds the dashboard and renders it as indented JSON with a
// trailing newline.
func generate() ([]byte, error) {
	d, err := build().Build()
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// checkFile decodes path strictly and validates it.
func checkFile(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	// Panel options and queries decode into their plugin's types only when
	// the plugins are registered; otherwise they stay untyped maps.
	plugins.RegisterDefaultPlugins()
	var d dashboard.Dashboard
	if err := failed(d.UnmarshalJSONStrict(raw)); err != nil {
		return fmt.Errorf("strict decoding: %w", err)
	}
	if err := failed(d.Validate()); err != nil {
		return fmt.Errorf("validation: %w", err)
	}
	return nil
}

// failed turns the SDK's "no errors" (a nil or empty cog.BuildErrors,
// which as an error interface is not nil) into nil.
func failed(err error) error {
	var errs cog.BuildErrors
	if errors.As(err, &errs) && len(errs) == 0 {
		return nil
	}
	return err
}
