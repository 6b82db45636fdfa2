package lab

import (
	"reflect"
	"testing"
)

func TestParseNodeFlag(t *testing.T) {
	got, err := ParseNodeFlag("n1=shop/web,legacy:out,,shop/api@api-sa")
	if err != nil {
		t.Fatal(err)
	}
	want := NodeConfig{Name: "n1", Pods: []PodConfig{
		{Name: "web", Namespace: "shop", Enrolled: true},
		{Name: "legacy"},
		{Name: "api", Namespace: "shop", ServiceAccount: "api-sa", Enrolled: true},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	for _, bad := range []string{"n1", "=a", "n1=shop/", "n1=@sa"} {
		if _, err := ParseNodeFlag(bad); err == nil {
			t.Errorf("ParseNodeFlag(%q) passed", bad)
		}
	}
}
