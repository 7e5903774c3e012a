# Build, test and install tokend and tokenctl.
#
#   make                      build bin/tokend and bin/tokenctl
#   make test                 the README's test command
#   sudo make install         binaries to /usr/local/bin, units and sysusers.d under /usr/local/lib
#   make install DESTDIR=/tmp/pkg PREFIX=/usr    for packagers
#
# The binaries are static (CGO_ENABLED=0): no libc, and Go's own DNS
# resolver, which the hardened unit's address families allow.

PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO          ?= go
BUILDFLAGS  ?= -trimpath -ldflags "-X main.version=$(VERSION)"

.PHONY: all build test install uninstall clean

all: build

build:
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o bin/tokend ./cmd/tokend
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o bin/tokenctl ./cmd/tokenctl

test:
	$(GO) test -race -count=1 ./...

# tokend.service names /usr/local/bin/tokend; the copy installed names
# $(BINDIR)/tokend (the path on the target system, without DESTDIR).
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR)
	install -m 0755 bin/tokend bin/tokenctl $(DESTDIR)$(BINDIR)/
	sed 's|^ExecStart=/usr/local/bin/tokend|ExecStart=$(BINDIR)/tokend|' systemd/tokend.service > $(DESTDIR)$(UNITDIR)/tokend.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/tokend.service
	install -m 0644 systemd/tokend.socket $(DESTDIR)$(UNITDIR)/tokend.socket
	install -m 0644 systemd/tokend.sysusers $(DESTDIR)$(SYSUSERSDIR)/tokend.conf

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/tokend $(DESTDIR)$(BINDIR)/tokenctl
	rm -f $(DESTDIR)$(UNITDIR)/tokend.service $(DESTDIR)$(UNITDIR)/tokend.socket
	rm -f $(DESTDIR)$(SYSUSERSDIR)/tokend.conf

clean:
	rm -rf bin
