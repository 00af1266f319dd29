// Command otelcol-spire-healer is a minimal OpenTelemetry Collector for the
// end-to-end trace test (tests/it/traces.rs), built by
// scripts/install-otelcol.sh. It has the upstream OTLP receiver, batch
// processor and debug exporter, plus `jsonfile`: a trace exporter of a few
// lines that appends each batch it receives to a file as one line of OTLP
// JSON (ptrace.JSONMarshaler), so the test can assert on exactly what the
// collector received. (The contrib `fileexporter` does the same but does not
// resolve against these core versions.)
package main

import (
	"context"
	"errors"
	"log"
	"os"
	"sync"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/batchprocessor"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	var errs []error
	receivers, err := otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory())
	errs = append(errs, err)
	processors, err := otelcol.MakeFactoryMap[processor.Factory](batchprocessor.NewFactory())
	errs = append(errs, err)
	exporters, err := otelcol.MakeFactoryMap[exporter.Factory](debugexporter.NewFactory(), newJSONFileFactory())
	errs = append(errs, err)
	return otelcol.Factories{
		Receivers:  receivers,
		Processors: processors,
		Exporters:  exporters,
		Telemetry:  otelconftelemetry.NewFactory(),
	}, errors.Join(errs...)
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{
			Command:     "otelcol-spire-healer",
			Description: "OpenTelemetry Collector for spire-healer's trace tests",
			Version:     "0.165.0",
		},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				DefaultScheme: "env",
				ProviderFactories: []confmap.ProviderFactory{
					envprovider.NewFactory(),
					fileprovider.NewFactory(),
				},
			},
		},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}

// === jsonfile exporter ===

type jsonFileConfig struct {
	// Path of the file to append OTLP JSON lines to; created if missing.
	Path string `mapstructure:"path"`
}

func newJSONFileFactory() exporter.Factory {
	return exporter.NewFactory(
		component.MustNewType("jsonfile"),
		func() component.Config { return &jsonFileConfig{} },
		exporter.WithTraces(createJSONFileTraces, component.StabilityLevelDevelopment),
	)
}

func createJSONFileTraces(_ context.Context, _ exporter.Settings, cfg component.Config) (exporter.Traces, error) {
	c := cfg.(*jsonFileConfig)
	if c.Path == "" {
		return nil, errors.New("jsonfile: path is required")
	}
	return &jsonFileExporter{path: c.Path}, nil
}

type jsonFileExporter struct {
	path string
	mu   sync.Mutex
	file *os.File
}

func (e *jsonFileExporter) Start(context.Context, component.Host) error {
	f, err := os.OpenFile(e.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	e.file = f
	return nil
}

func (e *jsonFileExporter) Shutdown(context.Context) error {
	if e.file == nil {
		return nil
	}
	return e.file.Close()
}

func (e *jsonFileExporter) Capabilities() consumer.Capabilities {
	return consumer.Capabilities{MutatesData: false}
}

func (e *jsonFileExporter) ConsumeTraces(_ context.Context, td ptrace.Traces) error {
	buf, err := (&ptrace.JSONMarshaler{}).MarshalTraces(td)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	// One write per line, so a reader never sees half a batch followed by
	// another batch's bytes.
	_, err = e.file.Write(append(buf, '\n'))
	return err
}
