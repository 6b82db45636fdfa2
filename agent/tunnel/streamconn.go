// This file hands a stream of HTTP requests to the destination node's proxy as a
// connection of its own (ServerConfig.ServeHTTP).

package tunnel

import (
	"fmt"
	"net/http"
)

// serveHTTP answers the CONNECT, gives the stream to ServeHTTP as a net.Conn and
// holds it open until the proxy closes it or the peer resets it.
func (s *Server) serveHTTP(st *h2stream, info *StreamInfo) {
	info.Status = http.StatusOK
	if err := st.respond(http.StatusOK, false); err != nil {
		st.Close()
		info.Err = fmt.Errorf("answer: %w", err)
		return
	}
	s.cfg.ServeHTTP(*info, st)
	<-st.ctx.Done()
	info.BytesIn, info.BytesOut = st.in.Load(), st.out.Load()
}
