# Test environment targets; included from the top-level Makefile:  include hack/Makefile.testenv.mk
.PHONY: deps testenv-up testenv-down testenv-status

deps: ## build/fetch test-environment dependencies (cached under $$SERVICEDB_CACHE)
	bash hack/install-deps.sh

testenv-up: ## start etcd, kube-apiserver, kube-controller-manager, Postgres, Kafka, Connect, NATS on 127.0.0.1
	bash hack/testenv.sh up

testenv-down: ## stop everything testenv-up started
	bash hack/testenv.sh down

testenv-status:
	bash hack/testenv.sh status
