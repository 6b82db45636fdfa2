package v1alpha1_test

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"k8s.io/apimachinery/pkg/runtime"
)

const metaPkg = "k8s.io/apimachinery/pkg/apis/meta/v1"

// fill sets every exported field reachable from v, writing into existing
// pointers, slices and maps rather than replacing them, so that filling a copy
// shows through in the original if the two share memory.
func fill(v reflect.Value, seed int) {
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		fill(v.Elem(), seed)
	case reflect.Struct:
		// Object and list metadata have Kubernetes' generated copies.
		if t := v.Type(); t.PkgPath() == metaPkg && (t.Name() == "ObjectMeta" || t.Name() == "ListMeta") {
			return
		}
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), seed)
			}
		}
	case reflect.Slice:
		if v.IsNil() {
			v.Set(reflect.MakeSlice(v.Type(), 2, 2))
		}
		for i := range v.Len() {
			fill(v.Index(i), seed+i)
		}
	case reflect.Map:
		if v.IsNil() {
			v.Set(reflect.MakeMap(v.Type()))
		}
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k, seed)
		fill(e, seed)
		v.SetMapIndex(k, e)
	case reflect.String:
		v.SetString("s" + string(rune('a'+seed%26)))
	case reflect.Int, reflect.Int32, reflect.Int64:
		v.SetInt(int64(seed + 1))
	case reflect.Uint8, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(seed + 1))
	case reflect.Bool:
		v.SetBool(seed%2 == 0)
	}
}

func TestDeepCopySharesNothing(t *testing.T) {
	for _, obj := range []runtime.Object{
		&v1alpha1.AuthorizationPolicy{}, &v1alpha1.AuthorizationPolicyList{},
		&v1alpha1.PeerAuthentication{}, &v1alpha1.PeerAuthenticationList{},
		&v1alpha1.TrafficPolicy{}, &v1alpha1.TrafficPolicyList{},
	} {
		name := reflect.TypeOf(obj).Elem().Name()
		fill(reflect.ValueOf(obj), 1)
		before, err := json.Marshal(obj)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		cp := obj.DeepCopyObject()
		if !reflect.DeepEqual(obj, cp) {
			t.Errorf("%s: copy differs from the original", name)
		}
		fill(reflect.ValueOf(cp), 7)
		after, _ := json.Marshal(obj)
		if string(before) != string(after) {
			t.Errorf("%s: changing the copy changed the original:\nbefore %s\nafter  %s", name, before, after)
		}
	}
}

func TestAddToScheme(t *testing.T) {
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"AuthorizationPolicy", "PeerAuthentication", "TrafficPolicy"} {
		gvk := v1alpha1.GroupVersion().WithKind(kind)
		if !s.Recognizes(gvk) {
			t.Errorf("scheme does not know %v", gvk)
		}
	}
}
