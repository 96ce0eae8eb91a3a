# Relay benchmark; included from the top-level Makefile:  include hack/bench-relay.mk
.PHONY: bench-relay
bench-relay: ## outbox relay: events/s, p50/p99 commit-to-consume latency, peak RSS; Poll/Logical x Kafka/NATS vs the insert ceiling
	bash hack/bench-relay.sh
