package e2e

import "github.com/tokend/tokend/internal/whop/whoptest"

var whoptestFault503 = whoptest.Fault{Status: 503}

func faultStatus(s int) whoptest.Fault { return whoptest.Fault{Status: s} }
