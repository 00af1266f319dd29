module github.com/spire-healer/spire-healer/deploy/grafana/gen

go 1.26

require github.com/grafana/grafana-foundation-sdk/go v0.0.22
